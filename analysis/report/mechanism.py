"""The report's mechanism-suppression section and figure (devinterp/metrics/mechanisms.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from analysis.dependence import (
    MechanismEffect,
    interventions_of,
    mechanism_sentences,
    variant_of,
)
from analysis.plots import (
    plot_mechanism,
)
from analysis.report.pipeline import progress_or_none
from analysis.report.text import intervention_text, shift_text, window_of
from devinterp.store.timeline import Timeline


def mechanism_figure(
    full: Timeline, variants: list[Timeline], out: Path, source: str, yardstick: str
) -> tuple[Path, list[str]]:
    """mechanism.png: per mechanism variant and the full run, each penalised metric's value,
    induction's progress and its copy preference over training; and the copy preference at the
    end, which tells an induction circuit from a shortcut that reaches the same progress."""
    runs: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    windows: dict[str, tuple[int, int | None] | None] = {}
    lines = []
    for timeline in [full, *variants]:
        kind, names = variant_of(timeline)
        if kind not in ("full", "mechanism"):
            continue
        label = "full" if kind == "full" else names[0]
        curves = {}
        for name in timeline.names("intervention/*/value")[:1]:  # a variant's first intervention
            curves["first intervention's value"] = (timeline.steps(name), timeline.values(name))
        if (progress := progress_or_none(timeline, "induction", source, yardstick)) is not None:
            curves[f"induction {source} progress"] = progress
        if (preference := copy_preference_curve(timeline)) is not None:
            curves["induction copy preference"] = preference
            final = preference[1][-1]
            lines.append(
                f"- {label}: copy preference at step {preference[0][-1]}: median {np.median(final):.2f} "
                f"(members {', '.join(f'{v:.2f}' for v in final)})"
            )
        runs[label] = curves
        windows[label] = window_of(timeline)
    if lines:
        lines = [
            "Copy preference: in contexts [x, y1, z, y2, x] where y1 and y2 can both follow x, the model's "
            "share p(y1) / (p(y1) + p(y2)) of the token that followed x, read from the weights "
            "(devinterp/metrics/mechanisms.py): 1 = it copies, about 0.5 = it knows which tokens may "
            "follow x but not which one did, the mark of a shortcut that reaches induction progress "
            "without a previous-token head.",
            "",
            *lines,
            "",
        ]
    return plot_mechanism(runs, windows, out / "mechanism.png"), lines


def _in_window(timeline: Timeline) -> str:
    """Each intervention's median value and gradient norm over the steps and members it acted on."""
    parts = []
    for name in timeline.names("intervention/*/active"):
        stem = name.removesuffix("/active")
        active = timeline.values(name) > 0  # (steps, members)
        if not active.any():
            continue
        value, grad = timeline.values(f"{stem}/value")[active], timeline.values(f"{stem}/grad_norm")[active]
        parts.append(
            f"{stem.removeprefix('intervention/')}: value {np.median(value):.3g}, gradient norm "
            f"{np.median(grad):.3g} (medians over the {int(active.sum())} member-steps it acted on)"
        )
    return f" ({'; '.join(parts)})" if parts else ""


def mechanism_lines(effects: list[MechanismEffect], variants: list[Timeline]) -> list[str]:
    """The report's section on mechanism variants: a table per primitive and variant, and a
    sentence for every mechanism a primitive needs."""
    if not effects:
        return []
    lines = ["## Mechanism suppression", ""]
    for timeline in variants:
        kind, names = variant_of(timeline)
        if kind == "mechanism":
            text = intervention_text(interventions_of(timeline))
            lines.append(f"- {names[0]}: {text}{_in_window(timeline)}")

    def onset(median: float) -> str:
        return "-" if math.isnan(median) else f"{median:.0f}"

    lines += [
        "",
        "| Y | variant | formed (variant / full) | median onset (variant / full) | formed after release | "
        "onset shift [95% CI] | final excess (variant / full) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in effects:
        after = (
            "-" if e.released_at is None else f"{e.formed_after_release} of {e.formed} (at {e.released_at})"
        )
        lines.append(
            f"| {e.y} | {e.variant} | {e.formed} / {e.full_formed} of {e.n_members} | "
            f"{onset(e.onset_median)} / {onset(e.full_onset_median)} | {after} | {shift_text(e.shift)} | "
            f"{e.final_excess:.4f} / {e.full_final_excess:.4f} | {e.verdict} |"
        )
    lines += [
        "",
        "Formed: the onset was reached by the last step. Final excess: the median over members of the "
        "primitive's probe excess at the last step (nats per token), the suppression's effect on the "
        "final model.",
        "",
    ]
    sentences = mechanism_sentences(effects, variants)
    return lines + [f"- {s}" for s in sentences] + ([""] if sentences else [])


def copy_preference_curve(timeline: Timeline) -> tuple[np.ndarray, np.ndarray] | None:
    """The share of the copied token among two plausible candidates
    (devinterp.metrics.mechanisms.copy_preference) at every weight snapshot: steps (n,), (n, members);
    None without snapshots, an induction primitive or a readable spec."""
    import torch

    from devinterp.metrics.mechanisms import copy_preference, two_candidate_contexts
    from devinterp.restore import run_language, snapshot_model  # torch: only where weights are read

    language = run_language(timeline)
    if language is None:
        return None
    tokens, copied, other = (torch.from_numpy(a) for a in two_candidate_contexts(language))
    slots = [s for s in range(len(timeline.snapshot_steps)) if timeline.snapshot_steps[s] >= 0]
    if not len(tokens) or not slots:
        return None
    steps, values = [], []
    with torch.no_grad():
        for slot in slots:
            model, step = snapshot_model(timeline, slot)
            steps.append(step)
            values.append(copy_preference(model, tokens, copied, other).numpy())
    return np.array(steps), np.stack(values)
