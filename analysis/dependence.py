"""Does learning Y need X first? Knock-out and knock-in runs against the full language.

A knock-out run removes X from the language (its positions fall back to the next rule down); a
knock-in run trains on X alone (with the category fallback) for a set number of steps, then on
the full language (a curriculum, as in Singh et al. 2024, arXiv 2404.07129, who clamp
sub-circuits instead). Runs share member seeds, so member k
of a variant pairs with member k of the full run. For every Y the onset shift in log(step + 1),
variant minus full, is reported per variant with a 95% bootstrap interval of its median and a
Wilcoxon signed-rank p-value; a Y that never forms in the variant is counted as blocked (its
shift is then a lower bound: the last step minus the full run's onset). In a knock-in run every
Y that was not in the first phase's data is timed from the switch to the full language: before
it Y could not be learned, and counting those steps would make every knock-in look like a delay.

Verdict per (Y, X):
- "Y needs X": knocking X out blocks or delays Y, and knocking X in speeds Y up;
- "Y is delayed by removing X": knocking X out blocks or delays Y, without a speed-up shown;
- "no evidence": otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import yaml
from scipy.stats import wilcoxon

from analysis.onset import Onset, primitive_onsets
from analysis.timeline import Timeline


@dataclass(frozen=True)
class Shift:
    """Onset shift of Y between a variant and the full run, over paired members."""

    n_units: int
    blocked: int  # members where Y formed in the full run but not in the variant
    median: float  # log(t_variant + 1) - log(t_full + 1); > 0 means later
    low: float
    high: float
    p: float
    dropped: int = 0  # pairs left out: Y formed in neither the full run nor the variant


@dataclass(frozen=True)
class Dependence:
    y: str
    x: str
    knock_out: Shift | None
    knock_in: Shift | None
    verdict: str


def onset_shift(full: list[Onset], variant: list[Onset], n_boot: int = 2000, seed: int = 0) -> Shift:
    """Paired shift of one primitive's onsets, variant minus full, in log(step + 1)."""
    shifts, blocked, dropped = [], 0, 0
    for a, b in zip(full, variant):
        if a.censored and b.censored:
            dropped += 1
            continue
        blocked += b.censored and not a.censored
        shifts.append(math.log(b.step + 1) - math.log(a.step + 1))
    if not shifts:
        return Shift(0, 0, math.nan, math.nan, math.nan, 1.0, dropped)
    values = np.array(shifts)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(values, size=(n_boot, len(values))), axis=1)
    nonzero = values[values != 0]
    p = float(wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else 1.0
    return Shift(
        len(values),
        int(blocked),
        float(np.median(values)),
        float(np.percentile(medians, 2.5)),
        float(np.percentile(medians, 97.5)),
        p,
        dropped,
    )


def config_section(timeline: Timeline, section: str) -> dict:
    """One section of the run's stored config (empty where the file has none)."""
    return (yaml.safe_load(timeline.meta.get("config", "")) or {}).get(section) or {}


def variant_of(timeline: Timeline) -> tuple[str, list[str]]:
    """("full" | "knockout" | "knockin", primitives) from the run's stored config."""
    data = config_section(timeline, "data")
    if data.get("knockout"):
        return "knockout", list(data["knockout"])
    if data.get("knockin"):
        return "knockin", list(data["knockin"])
    return "full", []


def switch_step_of(timeline: Timeline) -> int:
    """A knock-in run's switch to the full language (``data.knockin_steps``; 0 for other runs)."""
    data = config_section(timeline, "data")
    return int(data.get("knockin_steps") or 0) if data.get("knockin") else 0


def from_switch(onsets: dict[str, list[Onset]], switch: int, knocked_in: list[str]) -> dict[str, list[Onset]]:
    """A knock-in run's onsets of the primitives that were not in its data before ``switch``,
    counted from the switch (at least 0): before it they could not be learned, so the fair
    comparison with the full run is the time to learn them once they are in the data."""
    moved = {}
    for name, per_member in onsets.items():
        if name in knocked_in:
            moved[name] = per_member
            continue
        moved[name] = [
            replace(
                o,
                step=max(0.0, o.step - switch),
                low=max(0.0, o.low - switch),
                high=max(0.0, o.high - switch),
            )
            for o in per_member
        ]
    return moved


def seed_of(timeline: Timeline) -> int | None:
    """The run's model seed (member k was initialised with seed + k) from its stored config."""
    return config_section(timeline, "model").get("seed")


def dependence(
    full: Timeline | list[Timeline],
    variants: list[Timeline],
    level: float = 0.5,
    source: str = "probe",
    alpha: float = 0.01,
    yardstick: str = "fallback",
) -> list[Dependence]:
    """Verdicts for every (Y, X) where X has a knock-out or knock-in variant. With several full
    runs (a sweep over seeds) each variant pairs with the full run of its own seed, and the
    paired members of all seeds are pooled. Every variant's progress is measured on its full
    run's baselines (one yardstick: an onset shift measures the model, not a changed baseline)."""
    fulls = full if isinstance(full, list) else [full]
    full_by_seed, baselines_by_seed = {}, {}
    for timeline in fulls:
        seed = seed_of(timeline)
        if seed not in full_by_seed:
            full_by_seed[seed] = primitive_onsets(timeline, level=level, source=source, yardstick=yardstick)
            baselines_by_seed[seed] = timeline.baselines(yardstick)
    first = next(iter(full_by_seed.values()))
    first_baselines = next(iter(baselines_by_seed.values()))
    by_x: dict[str, dict[str, list[tuple[dict, dict]]]] = {}  # x -> kind -> [(full onsets, variant onsets)]
    for timeline in variants:
        kind, primitives = variant_of(timeline)
        if kind == "full":
            continue
        baselines = baselines_by_seed.get(seed_of(timeline), first_baselines)
        onsets = primitive_onsets(
            timeline, level=level, source=source, yardstick=yardstick, baselines=baselines
        )
        if kind == "knockin":  # the first phase holds X and the category fallback (Language.only)
            first_phase = primitives + [n for n, k in timeline.primitive_kinds.items() if k == "category"]
            onsets = from_switch(onsets, switch_step_of(timeline), first_phase)
        pair = (full_by_seed.get(seed_of(timeline), first), onsets)
        for x in primitives:
            by_x.setdefault(x, {}).setdefault(kind, []).append(pair)
    full_onsets = first
    results = []
    for x, kinds in by_x.items():
        for y in full_onsets:
            if y == x:
                continue
            shifts = {}
            for kind, pairs in kinds.items():
                pairs = [(a, b) for a, b in pairs if y in a and y in b]
                if pairs:
                    shifts[kind] = onset_shift(
                        [o for a, _ in pairs for o in a[y]], [o for _, b in pairs for o in b[y]]
                    )
            out, into = shifts.get("knockout"), shifts.get("knockin")
            hindered = (
                out is not None
                and out.n_units > 0
                and (out.blocked > out.n_units / 2 or (out.p < alpha and out.median > 0))
            )
            helped = into is not None and into.p < alpha and into.median < 0
            verdict = (
                "Y needs X"
                if hindered and helped
                else "Y is delayed by removing X"
                if hindered
                else "no evidence"
            )
            results.append(Dependence(y, x, out, into, verdict))
    return results
