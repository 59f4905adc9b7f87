"""Strategy curves: how far the model's predictions are from named exact strategies, per primitive.

A strategy is a predictor from visible tokens (Edelman et al., NeurIPS 2024, Fig. 1: a model on
in-context Markov chains passes from the uniform strategy to in-context unigram statistics to
the bigram posterior). Every primitive is compared with ``uniform``, the context-limited oracles
its type admits (``order<k>``) and its knock-out (the language without it), the predictions its
blind yardstick pools (devinterp/baselines.py), and with the strategies it declares itself
(``Primitive.strategies``: for ``markov_icl`` the in-context n-gram statistics and the Bayes
posterior). On the probe cadence the timeline group ``strategy`` records, per primitive and
strategy, the mean of KL(strategy || model) over the primitive's probe positions:
``strategy_kl/<primitive>/<strategy>`` (nats; 0 where the model predicts exactly as the
strategy does). The direction is the paper's: the strategy is the reference distribution.

This module builds the strategies' rows once, from the language and the probe set (numpy); the
probe evaluation (devinterp/probe.py) contracts them with the model's log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devinterp.language import plogp
from devinterp.store.schema import MetricInfo

STRATEGY_GROUP = "strategy"


@dataclass(frozen=True)
class StrategyTable:
    """The strategies' predictions at their primitives' probe positions, one row per (strategy,
    position), sorted by probe sequence."""

    infos: list[MetricInfo]  # one per (primitive, strategy): the group's metrics, in row order
    sequence: np.ndarray  # (rows,) int64: the probe sequence of each row
    position: np.ndarray  # (rows,) int64: the predicting position t (the prediction of token t + 1)
    strategy: np.ndarray  # (rows,) int64: index into ``infos``
    probs: np.ndarray  # (rows, V) float32: the strategy's prediction
    plogp: np.ndarray  # (rows,) float32: sum_v s log s of each row

    @property
    def names(self) -> list[str]:
        return [info.name for info in self.infos]


def strategy_table(
    language,
    tokens: np.ndarray,
    labels: np.ndarray,
    components_by_label: dict[int, dict[str, np.ndarray]],
) -> StrategyTable:
    """Every primitive's strategies on the probe set: tokens (n, T), labels (n, T-1) of the next
    token, ``components_by_label`` the blind components at each primitive's positions
    (devinterp/baselines.label_components), which are strategies too."""
    V = language.d_vocab
    infos: list[MetricInfo] = []
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (sequence, position, probs)
    for index, components in components_by_label.items():
        primitive = language.primitives[index - 1]
        sequence, position = np.nonzero(labels == index)
        own = {
            name: values[:, :-1][sequence, position] for name, values in primitive.strategies(tokens).items()
        }
        found = {"uniform": np.full((len(sequence), V), 1.0 / V), **components, **own}
        for name, rows in found.items():
            infos.append(
                MetricInfo(
                    f"strategy_kl/{primitive.name}/{name}",
                    "strategy",
                    primitive.name,
                    name,
                    unit="nats",
                    mass=float(len(sequence)),
                )
            )
            parts.append((sequence, position, rows))
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return StrategyTable([], empty, empty, empty, np.zeros((0, V), np.float32), np.zeros(0, np.float32))
    sequence = np.concatenate([p[0] for p in parts])
    position = np.concatenate([p[1] for p in parts])
    strategy = np.concatenate([np.full(len(p[0]), i) for i, p in enumerate(parts)])
    probs = np.concatenate([p[2] for p in parts])
    order = np.argsort(sequence, kind="stable")
    return StrategyTable(
        infos,
        sequence[order].astype(np.int64),
        position[order].astype(np.int64),
        strategy[order].astype(np.int64),
        probs[order].astype(np.float32),
        plogp(probs[order]).astype(np.float32),
    )
