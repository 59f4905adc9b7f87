"""The analysis of a set of runs: pooled onsets, ordering, dependence, mechanism effects (no text)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.dependence import (
    Dependence,
    LanguageShift,
    MechanismEffect,
    dependence,
    language_of,
    language_shifts,
    mechanism_effects,
    variant_of,
)
from analysis.onset import Onset, primitive_onsets, primitive_progress
from analysis.ordering import (
    Ordering,
    infer_ordering,
    lead_lag,
)
from analysis.strategies import run_switches
from analysis.units import Pool, censor_at, pool_units
from devinterp.store.timeline import Timeline, TimelineError


@dataclass(frozen=True)
class Analysis:
    primitives: list[str]
    onsets: dict[str, dict[str, list[Onset]]]  # source -> primitive -> onsets over units
    ordering: Ordering
    lead_lag: dict[str, float]  # "X->Y": log-step lag of Y behind X (positive: X leads)
    dependence: list[Dependence]
    n_units: int
    yardstick: str = "blind"  # what progress 0 means (devinterp/baselines.py)
    mechanism: list[MechanismEffect] = field(default_factory=list)
    unmeasurable: dict[str, list[str]] = field(default_factory=dict)  # source -> primitives
    controls: list[str] = field(default_factory=list)  # intervention runs analysed on their own
    # other yardstick -> its ordering DAG's edges, where it can be measured (schema 3 for blind)
    other_yardsticks: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    pool: Pool | None = None  # which members count, repeats left out, the common horizon
    # strategy switches (analysis/strategies.py) over units: event name -> onsets; ordered with the primitives
    switches: dict[str, list[Onset]] = field(default_factory=dict)
    languages: list[LanguageShift] = field(default_factory=list)  # runs of other languages, paired by seed
    other_languages: list[str] = field(default_factory=list)


YARDSTICK_TEXT = {
    "blind": "the best prediction of a model that cannot read what the primitive needs (the best pool of "
    "the knocked-out language, the context-limited oracles the primitive's type admits and uniform)",
    "knock_out": "the best prediction without the primitive (the knocked-out language mixed with uniform; "
    "uniform for the category fallback)",
    "uniform": "the uniform prediction",
}


def find_timelines(paths: list[str | Path]) -> list[Path]:
    """Timeline files under the given paths: a file, a run folder, or a folder of run folders."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif (path / "timeline.h5").is_file():
            found.append(path / "timeline.h5")
        elif path.is_dir() and sorted(path.glob("*/timeline.h5")):
            found += sorted(path.glob("*/timeline.h5"))
        else:
            raise TimelineError(f"{path}: no timeline.h5 here or in its run folders")
    return found


def progress_or_none(timeline: Timeline, primitive: str, source: str, yardstick: str = "blind"):
    try:
        steps, progress = primitive_progress(timeline, primitive, source, yardstick)
    except KeyError:  # no metric of this source for the primitive
        return None
    return None if np.isnan(progress).all() else (steps, progress)  # all NaN: unmeasurable


def pooled_onsets(
    timelines: list[Timeline],
    primitives: list[str],
    level: float,
    source: str,
    yardstick: str,
    pool: Pool,
) -> dict[str, list[Onset]]:
    """Every unit's onsets: each independent member once, censored at the shortest horizon
    (analysis/units.py: ``pool_units``)."""
    pooled: dict[str, list[Onset]] = {p: [] for p in primitives}
    for index, timeline in enumerate(timelines):
        onsets = primitive_onsets(timeline, primitives, level=level, source=source, yardstick=yardstick)
        for p in primitives:
            counted = [o for o in onsets.get(p, []) if o.member in pool.keep[index]]
            pooled[p] += censor_at(counted, pool.horizon)
    return {p: units for p, units in pooled.items() if units}  # primitives this source measures


def analyze_timelines(
    timelines: list[Timeline],
    level: float = 0.5,
    source: str = "probe",
    alpha: float = 0.01,
    yardstick: str = "blind",
) -> Analysis:
    full = [t for t in timelines if variant_of(t)[0] == "full"]
    variants = [t for t in timelines if variant_of(t)[0] != "full"]
    controls: list[str] = []
    if not full and variants and all(variant_of(t)[0] == "mechanism" for t in variants):
        # runs that train with interventions, given alone (a control such as the direct-path-only
        # model): analysed as they are, and said so
        full, variants = variants, []
        controls = sorted({variant_of(t)[1][0] for t in full})
    if not full:
        raise TimelineError(
            "no run of the full language among the timelines (only knock-out/knock-in variants)"
        )
    # runs of another language compare with the first run's by seed (not pooled with it)
    elsewhere = [t for t in full if language_of(t) != language_of(full[0])]
    full = [t for t in full if language_of(t) == language_of(full[0])]
    primitives = [p for p in full[0].label_names if p != "start"]
    pool = pool_units(full)
    onsets = {s: pooled_onsets(full, primitives, level, s, yardstick, pool) for s in ("probe", "weight")}
    switches = pooled_switches(full, pool)
    ordering = infer_ordering({**onsets[source], **switches}, alpha=alpha)

    def events_of(timeline: Timeline) -> dict[str, list[Onset]]:
        return {
            **primitive_onsets(timeline, level=level, source=source, yardstick=yardstick),
            **run_switches(timeline),
        }

    languages = language_shifts(full, elsewhere, events_of) if elsewhere else []
    curves = {p: c for p in primitives if (c := progress_or_none(full[0], p, source, yardstick)) is not None}
    measured = list(curves)
    if not measured:
        raise TimelineError(
            f"{full[0].path}: no primitive has a {source} progress metric to order by (a corpus "
            "without logp has no excess loss, and a corpus has no weight-derived metrics)"
        )
    lags = {
        f"{a}->{b}": lead_lag(curves[a][0], curves[a][1], curves[b][1])
        for i, a in enumerate(measured)
        for b in measured[i + 1 :]
    }
    found = (
        dependence(full, variants, level=level, source=source, alpha=alpha, yardstick=yardstick)
        if variants
        else []
    )
    effects = mechanism_effects(full, variants, level=level, source=source, alpha=alpha, yardstick=yardstick)
    unmeasurable = {
        s: [p for p in primitives if unmeasurable_on(full[0], p, s, yardstick)] for s in ("probe", "weight")
    }
    others = {}
    for other in YARDSTICK_TEXT:
        if other == yardstick:
            continue
        try:
            onsets_there = pooled_onsets(full, primitives, level, source, other, pool)
            others[other] = infer_ordering(onsets_there, alpha=alpha).edges
        except TimelineError:  # not measurable on it (an older schema): no sensitivity line
            continue
    return Analysis(
        primitives,
        onsets,
        ordering,
        lags,
        found,
        len(onsets[source][measured[0]]),
        yardstick,
        effects,
        unmeasurable,
        controls,
        others,
        pool,
        switches,
        languages,
        sorted({language_of(t) for t in elsewhere}),
    )


def pooled_switches(timelines: list[Timeline], pool: Pool) -> dict[str, list[Onset]]:
    """Every unit's strategy switches (analysis/strategies.py), pooled as ``pooled_onsets`` pools."""
    pooled: dict[str, list[Onset]] = {}
    for index, timeline in enumerate(timelines):
        for name, onsets in run_switches(timeline).items():
            counted = [o for o in onsets if o.member in pool.keep[index]]
            pooled.setdefault(name, []).extend(censor_at(counted, pool.horizon))
    return pooled


def yardstick_sensitivity(result: Analysis) -> list[str]:
    """One line per ordering edge that another yardstick reverses, drops or adds (its edges are
    every significant edge, not the transitive reduction), so an order that stands on what
    progress 0 means is read as such."""
    mine = set(result.ordering.edges)
    lines = []
    for other, edges in result.other_yardsticks.items():
        theirs = set(edges)
        for a, b in sorted(mine - theirs):
            change = f"reversed ({b} -> {a})" if (b, a) in theirs else "not significant"
            lines.append(f"Sensitivity: {a} -> {b} is {change} on the {other} yardstick.")
        for a, b in sorted(theirs - mine):
            if (b, a) not in mine:
                lines.append(f"Sensitivity: {a} -> {b} is an edge on the {other} yardstick only.")
    return lines


def unmeasurable_on(timeline: Timeline, primitive: str, source: str, yardstick: str) -> bool:
    """The primitive has metrics of this source, and none is measurable on the yardstick."""
    try:
        _, progress = primitive_progress(timeline, primitive, source, yardstick)
    except KeyError:
        return False
    return bool(np.isnan(progress).all())
