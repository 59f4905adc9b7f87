"""Strategy curves read back: which strategy the model is closest to at each step, and when it
switches (Edelman et al., NeurIPS 2024: uniform -> in-context unigram -> in-context bigram).

The timeline's group ``strategy`` holds KL(strategy || model) per primitive, strategy and member
(devinterp/strategies.py). Conventions, stated once: a switch S -> S' of a member is the first
probe step after which S' stays closer to the model than S, found as onsets are (the difference
KL(S || model) - KL(S' || model) binned on the log-step grid, smoothed, and the first step after
which it stays >= 0: ``analysis.onset.threshold_onsets`` at level 0), censored at the last step
if it never does. Switches are ``Onset`` records named ``<primitive>:<S>><S'>``, so the ordering
and dependence analyses take them as they take a primitive's onsets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from analysis.onset import Onset, log_grid, moving_average, threshold_onsets

GENERIC = ("uniform", "knock_out", "order0", "order1", "order2")  # every primitive's strategies


@dataclass(frozen=True)
class StrategyCurves:
    """One primitive's strategy curves: steps (N,), strategy names (S,), kl (N, S, member)."""

    primitive: str
    steps: np.ndarray
    names: list[str]
    kl: np.ndarray

    @property
    def declared(self) -> list[str]:
        """The strategies the primitive declares itself (not the generic ones), in its order."""
        return [name for name in self.names if name not in GENERIC]

    def of(self, name: str) -> np.ndarray:
        """(N, member) KL(strategy || model)."""
        return self.kl[:, self.names.index(name)]


def strategy_curves(timeline, primitive: str) -> StrategyCurves:
    """A primitive's curves from a timeline (KeyError naming the file when it has none)."""
    names = (
        timeline.names(f"strategy_kl/{primitive}/*", group="strategy")
        if "strategy" in timeline.groups
        else []
    )
    if not names:
        raise KeyError(f"{timeline.path}: no strategy curves for primitive {primitive!r}")
    kl = np.stack([timeline.values(name) for name in names], axis=1)  # (N, S, member)
    return StrategyCurves(primitive, timeline.steps(names[0]), [n.split("/", 2)[2] for n in names], kl)


def primitives_with_strategies(timeline) -> list[str]:
    """The primitives that declare strategies of their own (e.g. markov_icl), in label order."""
    if "strategy" not in timeline.groups:
        return []
    found = {
        n.split("/")[1]
        for n in timeline.names("strategy_kl/*", group="strategy")
        if n.split("/", 2)[2] not in GENERIC
    }
    return [p for p in timeline.label_names if p in found]


def closest(
    curves: StrategyCurves, among: list[str] | None = None, smooth: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """(grid steps (G,), index into ``among`` of the closest strategy (G, member)), on the
    smoothed log-step grid the switches use; ``among`` defaults to every strategy."""
    among = among or curves.names
    values = np.stack([curves.of(name) for name in among], axis=1)  # (N, S, member)
    grid_steps, grid = log_grid(curves.steps, values)
    return grid_steps, moving_average(grid, smooth).argmin(axis=1)


def phases(curves: StrategyCurves, among: list[str] | None = None) -> list[list[str]]:
    """Per member, the closest strategies in the order they held (repeats merged)."""
    among = among or curves.names
    _, best = closest(curves, among)
    out = []
    for member in range(best.shape[1]):
        sequence = [among[i] for i in best[:, member]]
        out.append([s for i, s in enumerate(sequence) if i == 0 or s != sequence[i - 1]])
    return out


def switch_name(primitive: str, before: str, after: str) -> str:
    """The event name of a switch, ``<primitive>:<before>><after>`` (e.g. ``chain:unigram>bigram``)."""
    return f"{primitive}:{before}>{after}"


def switch_onsets(curves: StrategyCurves, before: str, after: str) -> list[Onset]:
    """When ``after`` becomes and stays closer than ``before``, per member (module docstring)."""
    name = switch_name(curves.primitive, before, after)
    gap = curves.of(before) - curves.of(after)  # > 0 where ``after`` is closer
    return [replace(o, method="switch") for o in threshold_onsets(name, curves.steps, gap, level=0.0)]


def strategy_path(curves: StrategyCurves) -> list[str]:
    """The path of the paper's figure: uniform, then the primitive's own strategies in order."""
    return ["uniform", *curves.declared]


def path_switches(curves: StrategyCurves) -> dict[str, list[Onset]]:
    """The switches from each strategy of ``strategy_path`` to every later one, by name (the
    consecutive ones are the paper's phases; uniform > bigram is defined alike under any prior)."""
    path = strategy_path(curves)
    return {
        switch_name(curves.primitive, a, b): switch_onsets(curves, a, b)
        for i, a in enumerate(path)
        for b in path[i + 1 :]
    }


def run_switches(timeline) -> dict[str, list[Onset]]:
    """Every switch of every primitive that declares strategies, one onset per member."""
    out = {}
    for primitive in primitives_with_strategies(timeline):
        out.update(path_switches(strategy_curves(timeline, primitive)))
    return out
