"""The report's first sections: the header, the onsets, the ordering and the dependence verdicts."""

from __future__ import annotations

import math
from pathlib import Path

from analysis.dependence import UNTESTABLE
from analysis.report.pipeline import YARDSTICK_TEXT, Analysis, yardstick_sensitivity
from analysis.report.text import (
    dependence_power_text,
    disagree,
    median_iqr,
    pooled_runs_lines,
    power_text,
    run_header,
    shift_text,
)
from devinterp.store.schema import UNMEASURABLE
from devinterp.store.timeline import Timeline


def header_lines(
    result: Analysis,
    files: list[Path],
    full: list[tuple[Path, Timeline]],
    level: float,
    source: str,
    alpha: float,
    yardstick: str,
) -> list[str]:
    """The title, the first run's header, what was pooled and how onsets and progress are defined."""
    t = f"t{round(level * 100)}"
    return [
        f"# Analysis of {len(files)} run(s)",
        "",
        run_header(full[0][1]),
        "",
        f"Runs: {', '.join(str(f.parent) for f in files)}. Units (run, member) of the full language: "
        f"{result.n_units}. Onset = {t} of each primitive's progress, 1 - sum(excess) / sum(baseline) "
        "over its probe positions, or over its rules' weight-derived KLs weighted by their positions; "
        f"ordering from the {source} onsets, Holm-corrected Wilcoxon at alpha = {alpha}. Progress 0 = "
        f"{YARDSTICK_TEXT[yardstick]} (`--yardstick {yardstick}`), 1 = the true distribution"
        + (
            "; every knock-out/knock-in variant is measured on its full run's baselines."
            if result.dependence
            else "."
        ),
        "",
        *pooled_runs_lines(full, result.pool),
        *(
            [
                f"These runs train with interventions ({', '.join(result.controls)}: mechanism.interventions "
                "in their config) and are analysed on their own, as a control: no full run was given.",
                "",
            ]
            if result.controls
            else []
        ),
    ]


def onset_lines(result: Analysis, level: float, yardstick: str) -> list[str]:
    """The onsets table (probe and weight t-level per primitive) and the unmeasurable primitives."""
    t = f"t{round(level * 100)}"
    lines = [
        "## Onsets (step; median [IQR] over units)",
        "",
        f"| primitive | probe {t} | weight {t} | probe and weights disagree |",
        "|---|---|---|---|",
    ]
    for p in result.primitives:
        probe, weight = result.onsets["probe"].get(p, []), result.onsets["weight"].get(p, [])
        lines.append(f"| {p} | {median_iqr(probe)} | {median_iqr(weight)} | {disagree(probe, weight)} |")
    for source_name, names in result.unmeasurable.items():
        lines += [
            f"Unmeasurable on the {yardstick} yardstick ({source_name}): {p}: a model that cannot "
            f"implement it already predicts within {UNMEASURABLE:.0%} of the truth what it adds over "
            "uniform; left out of the ordering."
            for p in names
        ]
    return lines + [
        "",
        "A censored onset means the primitive was never learned by the last step: it is reported as "
        "censored, not as a late number.",
        "",
    ]


def ordering_lines(result: Analysis) -> list[str]:
    """The pairwise ordering table, what a missing edge means, the power line, the DAG and the
    yardstick sensitivity."""
    lines = [
        "## Ordering",
        "",
        "| X | Y | units | X first | Y first | ties | P(X first) [95% CI] | median gap (log step) | "
        "sign p | Wilcoxon p | Holm p | edge | same time: Holm p | lead-lag (log step) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in result.ordering.pairs:
        edge = {"x->y": f"{pair.x} -> {pair.y}", "y->x": f"{pair.y} -> {pair.x}"}.get(pair.edge, "")
        lag = result.lead_lag.get(f"{pair.x}->{pair.y}", math.nan)
        p_x_first = (
            f"{pair.p_x_first:.2f} [{pair.p_x_first_low:.2f}, {pair.p_x_first_high:.2f}]"
            if pair.x_first + pair.y_first
            else "all tied: no order to test"
        )
        same_mark = " (same time)" if pair.same_time else " (ordered, but close)" if pair.close else ""
        lines.append(
            f"| {pair.x} | {pair.y} | {pair.n_units} | {pair.x_first} | {pair.y_first} | {pair.ties} | "
            f"{p_x_first} | {pair.median_log_gap:+.2f} | {pair.sign_p:.2g} | {pair.wilcoxon_p:.2g} | "
            f"{pair.holm_p:.2g} | {edge} | {pair.equivalence_holm_p:.2g}{same_mark} | {lag:+.2f} |"
        )
    dag = ", ".join(f"{a} -> {b}" for a, b in result.ordering.dag)
    margin = result.ordering.margin
    lines += [
        "",
        "Columns: a unit is one member of one run; X first / Y first / ties count units by which onset "
        "came first; the gap is log(t_Y + 1) - log(t_X + 1), median over units (> 0: X first); "
        "lead-lag is the shift in log(step + 1) that maximises the correlation of the two "
        "member-averaged progress derivatives (> 0: X leads); it has no interval and depends on the "
        "run's length (the grid spans the whole run), so read it beside the onsets, never alone. "
        f"Same time: two one-sided Wilcoxon tests (TOST) that the gaps lie within +-{margin:g} log-steps, "
        "Holm-corrected; a unit where only one of the two formed counts as beyond the margin.",
        "",
        no_order_text(result),
        "",
        power_text(result.ordering, result.n_units),
        "",
        f"Ordering DAG (transitive reduction): {dag} (figure: ordering_dag.png, below)."
        if dag
        else "Ordering DAG: no significant edge, so no figure.",
        "",
    ]
    if result.other_yardsticks:
        lines += yardstick_sensitivity(result) or [
            f"Sensitivity: every edge is the same on the {' and '.join(result.other_yardsticks)} "
            "yardstick" + ("s." if len(result.other_yardsticks) > 1 else ".")
        ]
        lines.append("")
    return lines


def no_order_text(result: Analysis) -> str:
    """What the pairs without an edge mean: learned at the same time, not shown, or ordered but close."""
    margin = result.ordering.margin
    same = [p for p in result.ordering.pairs if p.same_time]
    text = (
        f"No order: {', '.join(f'{p.x} and {p.y} (Holm p {p.equivalence_holm_p:.2g})' for p in same)} are "
        f"learned at the same time within +-{margin:g} log-steps (x{math.exp(margin):.2f} in step)."
        if same
        else f"No pair is shown to be learned at the same time within +-{margin:g} log-steps, so a missing "
        'edge means "not shown", not "no order".'
    )
    close = [p for p in result.ordering.pairs if p.close]
    if close:
        text += (
            " Ordered, but close: "
            + ", ".join(
                f"{p.x if p.edge == 'x->y' else p.y} before {p.y if p.edge == 'x->y' else p.x} (Holm p "
                f"{p.holm_p:.2g}), by less than {margin:g} log-steps (Holm p {p.equivalence_holm_p:.2g})"
                for p in close
            )
            + ": each pair comes in a consistent order, a small step apart."
        )
    return text


def dependence_lines(result: Analysis, alpha: float) -> list[str]:
    """The knock-out / knock-in table, its notes and the power line; nothing without variants."""
    if not result.dependence:
        return []
    lines = [
        "## Dependence (knock-out / knock-in)",
        "",
        "| Y | X | knock-out shift [95% CI], blocked | knock-in shift [95% CI] | verdict |",
        "|---|---|---|---|---|",
    ]
    notes = [
        "Shifts are in log(step + 1), variant minus full, median over paired members (> 0: later). "
        "A knock-in run's Y is timed from its switch to the full language (before it Y was not "
        "in the data), so a knock-in shift < 0 means Y formed faster once it could."
    ]
    for d in result.dependence:
        verdict = d.verdict.replace("Y", d.y).replace("X", d.x)
        lines.append(f"| {d.y} | {d.x} | {shift_text(d.knock_out)} | {shift_text(d.knock_in)} | {verdict} |")
        if d.verdict == UNTESTABLE:
            notes.append(
                f"Untestable: knocking out {d.x} leaves nothing that produces {d.lacks}, which the "
                f"condition of {d.y} needs; {d.y} cannot occur in that variant (known before training, "
                f"devinterp/language/reachability.py), so its onset there is not 'never learned' and "
                f"says nothing about whether learning {d.y} needs {d.x}."
            )
    return lines + [
        "",
        *[line for note in notes for line in (note, "")],
        dependence_power_text(result.dependence, alpha),
        "",
    ]
