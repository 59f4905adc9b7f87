"""What the probe measures: the metric catalogue of the timeline group ``probe``, a pure function of
the language, the probe set and the model's shape (the ProbeMetrics callback only computes it).

Conventions, stated once: excess is in nats over the truth, KL(true || model), with each
primitive's blind and knock-out baselines (devinterp/baselines.py) and the positions it averages
over (``mass``); cross-entropy = entropy + excess, so a baseline's cross-entropy is its excess
plus the entropy; the uniform prediction's excess is log V + E log p, its cross-entropy log V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from devinterp.baselines import Baselines, label_components, probe_baselines
from devinterp.language import Primitive
from devinterp.probe import grouped_sums, span_queries, uniform_share
from devinterp.store.schema import MetricInfo
from devinterp.strategies import StrategyTable, strategy_table


def icl_positions(seq_len: int) -> tuple[int, int]:
    """(early, late) predicted positions for the ICL score: a tenth of the way in, and the last
    (Olsson et al. use tokens 50 and 500 of 512)."""
    return max(1, round(0.1 * (seq_len - 1))), seq_len - 2


@dataclass
class ProbeCatalogue:
    """The metric infos of the group ``probe`` (their order is the rows' order) and what
    computing them needs."""

    infos: list[MetricInfo]
    has_excess: bool  # False for a corpus without exact distributions
    label_names: list[str]
    rule_names: list[str]
    label_columns: list[int]  # labels (primitives) with at least one probe position
    rule_columns: list[int]  # rules with at least one probe position
    icl_early: int
    icl_late: int
    spans: list[Primitive]  # span primitives (quotes, brackets) with a query in the probe set
    span_opens: Tensor | None  # (span primitive, probe sequence, pos): their open positions
    strategies: StrategyTable | None  # the group ``strategy`` (None for a corpus)


def probe_catalogue(language, probe, seq_len: int, n_layers: int, n_heads: int) -> ProbeCatalogue:
    """The probe's metrics: excess, accuracy and cross-entropy per primitive, excess per rule,
    loss per position, the ICL score of Olsson et al. (2022) and each head's attention from inside
    a span to its open token; and the strategy curves' table (devinterp/strategies.py)."""
    components = None  # each primitive's blind components at its positions: baselines and strategies
    if probe.true_next is not None and hasattr(language, "context_oracles"):  # not a corpus
        components = label_components(
            language, language.context_oracles(seq_len), probe.tokens.numpy(), probe.labels[:, 1:].numpy()
        )
    labels, rules = probe.labels[:, 1:].flatten(), probe.rules[:, 1:].flatten()
    plogp = probe.true_plogp.double().flatten()[None]  # (1, positions); NaN: a corpus without logp
    by_label = grouped_sums(plogp, labels, len(language.label_names))  # (sums, counts), each (1, label)
    by_rule = grouped_sums(plogp, rules, len(language.rule_names))
    label_columns = [i for i, n in enumerate(by_label[1][0].tolist()) if n > 0]
    rule_columns = [i for i, n in enumerate(by_rule[1][0].tolist()) if n > 0]
    infos = excess_infos(language, probe, seq_len, by_label, by_rule, label_columns, rule_columns, components)
    infos += [
        MetricInfo(f"probe_loss/pos{t + 1}", "probe", "all", f"pos{t + 1}", unit="nats")
        for t in range(seq_len - 1)
    ]
    icl_early, icl_late = icl_positions(seq_len)
    infos.append(MetricInfo("icl/score", "probe", "all", f"pos{icl_late + 1}-pos{icl_early + 1}"))
    spans, span_opens, span_infos = span_attention(language, probe, n_layers, n_heads)
    return ProbeCatalogue(
        infos=infos + span_infos,
        has_excess=probe.has_excess,
        label_names=list(language.label_names),
        rule_names=list(language.rule_names),
        label_columns=label_columns,
        rule_columns=rule_columns,
        icl_early=icl_early,
        icl_late=icl_late,
        spans=spans,
        span_opens=span_opens,
        strategies=None
        if components is None
        else strategy_table(language, probe.tokens.numpy(), probe.labels[:, 1:].numpy(), components),
    )


def excess_infos(
    language,
    probe,
    seq_len: int,
    by_label: tuple[Tensor, Tensor],
    by_rule: tuple[Tensor, Tensor],
    label_columns: list[int],
    rule_columns: list[int],
    components: dict[int, dict[str, np.ndarray]] | None,
) -> list[MetricInfo]:
    """Excess (overall, per primitive, per rule; only with exact distributions), accuracy and
    cross-entropy per primitive, each with its yardsticks; ``by_label`` and ``by_rule`` are the
    sums of sum_v p log p over each label's and rule's probe positions and their counts;
    ``components`` the blind components by label (None for a corpus: no yardsticks)."""
    plogp = probe.true_plogp.double().flatten()[None]  # (1, positions)
    log_v = math.log(language.d_vocab)
    (label_sums, label_counts), (rule_sums, rule_counts) = by_label, by_rule
    by_label, by_rule = (label_sums / label_counts)[0].tolist(), (rule_sums / rule_counts)[0].tolist()
    names = language.label_names
    label_baselines, rule_baselines = {}, {}
    if components is not None:
        label_baselines, rule_baselines = probe_baselines(
            language,
            language.context_oracles(seq_len),
            probe.tokens.numpy(),
            probe.true_next.double().numpy(),
            probe.labels[:, 1:].numpy(),
            probe.rules[:, 1:].numpy(),
            components,
        )
    infos = []
    if probe.has_excess:
        infos.append(
            MetricInfo(
                "probe/excess",
                "probe",
                "all",
                "all",
                float(plogp.mean()) + log_v,
                0.0,
                unit="nats",
                mass=float(plogp.shape[1]),
            )
        )
        infos += [
            MetricInfo(
                f"probe_excess/{names[i]}",
                "probe",
                names[i],
                "all",
                by_label[i] + log_v,
                0.0,
                unit="nats",
                **yardsticks(label_baselines.get(i), label_counts[0, i]),
            )
            for i in label_columns
        ]
    infos += [MetricInfo(f"probe_acc/{names[i]}", "probe", names[i], "all") for i in label_columns]
    infos += [  # cross-entropy = entropy + excess: a baseline's is entropy + its excess
        MetricInfo(
            f"probe_ce/{names[i]}",
            "probe",
            names[i],
            "all",
            log_v,
            -by_label[i],
            unit="nats",
            **yardsticks(label_baselines.get(i), label_counts[0, i], shift=-by_label[i]),
        )
        for i in label_columns
    ]
    for i in rule_columns if probe.has_excess else ():
        primitive, rule = language.rule_names[i].split("/", 1)
        infos.append(
            MetricInfo(
                f"probe_excess/{primitive}/{rule}",
                "probe",
                primitive,
                rule,
                by_rule[i] + log_v,
                0.0,
                **yardsticks(rule_baselines.get(i), rule_counts[0, i]),
            )
        )
    return infos


def yardsticks(baselines: Baselines | None, count, shift: float = 0.0) -> dict:
    """A metric's baselines as MetricInfo fields, ``shift`` added (cross-entropy = excess + entropy)."""
    if baselines is None:
        return {"mass": float(count)}
    return {
        "knock_out": baselines.knock_out + shift,
        "blind": baselines.blind + shift,
        "blind_from": baselines.blind_from,
        "mass": float(count),
    }


def span_attention(
    language, probe, n_layers: int, n_heads: int
) -> tuple[list[Primitive], Tensor | None, list[MetricInfo]]:
    """(span primitives, their open positions (span, sequence, pos), one attention metric per head
    and span primitive). A span primitive with no query in this probe set has nothing to average:
    a mean over an empty set is not a diverged model, so it gets no metric, as a primitive's
    excess with no position gets none."""
    inputs = probe.tokens[:, :-1].numpy()
    found = [(p, p.open_positions(inputs)) for p in language.primitives]
    found = [(p, o) for p, o in found if o is not None and span_queries(torch.from_numpy(o)).any()]
    spans, opens = [p for p, _ in found], [o for _, o in found]
    infos = [
        MetricInfo(
            f"probe_attn/{primitive.name}/L{layer}H{head}",
            "probe_attention",
            primitive.name,
            f"L{layer}H{head}",
            uniform_share(where),
            1.0,
        )
        for primitive, where in zip(spans, opens)
        for layer in range(n_layers)
        for head in range(n_heads)
    ]
    return spans, torch.from_numpy(np.stack(opens)) if spans else None, infos
