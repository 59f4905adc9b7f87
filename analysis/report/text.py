"""Small pieces of report text: intervals, shifts, power lines, the run header."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from analysis.dependence import (
    Dependence,
    interventions_of,
    released_at,
)
from analysis.onset import Onset
from analysis.ordering import (
    Ordering,
    smallest_holm_p,
    smallest_wilcoxon_p,
    units_needed,
)
from analysis.units import Pool, pool_text
from devinterp.store.timeline import Timeline


def median_iqr(onsets: list[Onset]) -> str:
    if not onsets:
        return "not measured"
    learned = [o.step for o in onsets if not o.censored]
    censored = sum(o.censored for o in onsets)
    if not learned:
        return f"censored ({censored}/{len(onsets)} never learned)"
    q1, q2, q3 = np.percentile(learned, [25, 50, 75])
    text = f"{q2:.0f} [{q1:.0f}, {q3:.0f}]"
    return text + (f", {censored}/{len(onsets)} censored" if censored else "")


def dag_labels(ordering: Ordering) -> dict[tuple[str, str], str]:
    """Each DAG arrow's evidence: units in which its source came first, and the corrected p."""
    labels = {}
    for pair in ordering.pairs:
        decided = pair.x_first + pair.y_first
        for a, b, first in ((pair.x, pair.y, pair.x_first), (pair.y, pair.x, pair.y_first)):
            if (a, b) in ordering.dag:
                labels[a, b] = f"{first}/{decided} first, Holm p {pair.holm_p:.2g}"
    return labels


def power_text(ordering: Ordering, n_units: int) -> str:
    """What the test can show with these units: the smallest reachable corrected p, and a
    warning, with the units that would do, when alpha is out of reach."""
    n_pairs = len(ordering.pairs)
    untied = max((p.x_first + p.y_first for p in ordering.pairs), default=0)
    best = smallest_holm_p(untied, n_pairs)
    text = (
        f"Power: with {untied} untied units (of {n_units}) and {n_pairs} pairs, the smallest Holm-corrected "
        f"p any pair can reach is {best:.2g} (every unit one way: 2 / 2^n, times {n_pairs})"
    )
    if best >= ordering.alpha:
        return (
            f"{text}. **alpha = {ordering.alpha} is out of reach: no edge can be found with these units**; "
            f"{units_needed(n_pairs, ordering.alpha)} untied units would reach it."
        )
    return f"{text}, below alpha = {ordering.alpha}."


def dependence_power_text(found: list[Dependence], alpha: float) -> str:
    """What the dependence tests can show: each shift's Wilcoxon test (uncorrected) on its paired
    units, with the smallest p the fewest of them can reach, and a warning when alpha is out of
    reach (then "no evidence" means "not testable here", not "no effect")."""
    sizes = [s.n_tested for d in found for s in (d.knock_out, d.knock_in) if s is not None]
    if not sizes or max(sizes) < 2:
        return (
            "Power: no shift has 2 or more paired units with a nonzero shift, so no Wilcoxon verdict "
            "is reachable; only a blocked majority (Y never formed in the variant) can give one."
        )
    fewest = min(sizes)
    best = smallest_wilcoxon_p(fewest)
    text = (
        f"Power: the shifts are tested on {fewest} to {max(sizes)} paired units with a nonzero shift; "
        f"with {fewest} the smallest Wilcoxon p a shift can reach is {best:.2g}"
    )
    if best >= alpha:
        return (
            f'{text}. **alpha = {alpha} is out of reach for those shifts: their "no evidence" means '
            f'"not testable with these units"**; {units_needed(1, alpha)} units would reach it '
            '(a blocked majority still gives "delayed").'
        )
    return f"{text}, below alpha = {alpha}."


def shift_text(shift) -> str:
    if shift is None:
        return "-"
    dropped = f"; {shift.dropped} pairs left out (formed in neither run)" if shift.dropped else ""
    if not shift.n_units:
        return f"formed in neither run{dropped}"
    if shift.blocked:  # a unit where Y never formed counts the run's end: the shift is at least that
        return (
            f">= {shift.median:+.2f} [>= {shift.low:+.2f}, >= {shift.high:+.2f}], p {shift.p:.2g}, lower "
            f"bounds: never formed in the variant in {shift.blocked} of {shift.n_units}{dropped}"
        )
    return f"{shift.median:+.2f} [{shift.low:+.2f}, {shift.high:+.2f}], p {shift.p:.2g}{dropped}"


def window_of(timeline: Timeline) -> tuple[int, int | None] | None:
    """A mechanism variant's intervention window (first from_step, release or None), else None."""
    interventions = interventions_of(timeline)
    if not interventions:
        return None
    return min(int(i.get("from_step") or 0) for i in interventions), released_at(interventions)


def intervention_text(interventions: list[dict]) -> str:
    parts = []
    for i in interventions:
        what = (
            f"penalty {i.get('metric')} x {i.get('weight')}"
            if i.get("kind") == "penalty"
            else f"clamp {i.get('component')} ({i.get('hold', 'zero')})"
        )
        members = f", members {i['members']}" if i.get("members") else ""
        parts.append(f"{what}, steps {i.get('from_step') or 0}-{i.get('to_step') or 'end'}{members}")
    return "; ".join(parts)


def disagree(probe: list[Onset], weight: list[Onset]) -> str:
    if not probe or not weight:
        return ""
    a = [math.log(o.step + 1) for o in probe if not o.censored]
    b = [math.log(o.step + 1) for o in weight if not o.censored]
    if not a or not b:
        return "yes (censored in one)" if bool(a) != bool(b) else ""
    gap = float(np.median(b) - np.median(a))
    return (
        f"yes (weights {'later' if gap > 0 else 'earlier'} by x{math.exp(abs(gap)):.1f})"
        if abs(gap) > 0.5
        else ""
    )


def run_header(timeline: Timeline) -> str:
    """The first full run's steps, members, model and language, from its stored config."""
    config = yaml.safe_load(timeline.meta.get("config", "")) or {}
    model, data = config.get("model") or {}, config.get("data") or {}
    keys = ("n_layers", "n_heads", "d_model", "d_head", "attention") + (
        ("d_mlp",) if model.get("mlp") else ()
    )
    shape = ", ".join(f"{key} {model[key]}" for key in keys if model.get(key) is not None)
    language = Path(str(data.get("language") or data.get("corpus") or "?")).name
    return (
        f"Run {timeline.run_name}: {timeline.last_step} steps, {timeline.n_members} members; "
        f"model: {shape or 'see config.yaml'}; "
        f"language {language}, sequences of {data.get('seq_len', '?')}, batch {data.get('batch_size', '?')}."
    )


def pooled_runs_lines(full: list[tuple[Path, Timeline]], pool: Pool | None) -> list[str]:
    """Where several runs pool: each with its steps, members and the members counted, then the
    repeats left out and the common horizon (analysis/units.py)."""
    if pool is None or len(full) < 2:
        return []
    runs = "; ".join(
        f"{t.run_name}: {t.last_step} steps, {t.n_members} members, {len(pool.keep[i])} counted"
        for i, (_, t) in enumerate(full)
    )
    return [f"Pooled runs: {runs}.", "", *(f"{line}\n" for line in pool_text(pool))]
