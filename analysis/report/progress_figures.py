"""The report's progress figures: progress per primitive, weight against probe, the ordering DAG
and the variants beside the full run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.dependence import switch_step_of, variant_of
from analysis.onset import primitive_progress
from analysis.plots import plot_dag, plot_progress, plot_variants, plot_weight_vs_probe
from analysis.report.pipeline import YARDSTICK_TEXT, Analysis, progress_or_none
from analysis.report.text import dag_labels, window_of
from devinterp.store.timeline import Timeline


def progress_curves(result: Analysis, first: Timeline, source: str, yardstick: str) -> dict[str, np.ndarray]:
    """{primitive: progress (step, member)} of the first full run, where it can be measured."""
    found = {p: progress_or_none(first, p, source, yardstick) for p in result.primitives}
    return {p: curve for p, curve in found.items() if curve is not None}


def progress_figures(
    result: Analysis,
    first: Timeline,
    curves: dict[str, np.ndarray],
    variants: list[Timeline],
    out: Path,
    source: str,
    yardstick: str,
    level: float,
) -> list[Path]:
    """progress.png, weight_vs_probe.png, ordering_dag.png (only with an edge) and variants.png
    (only with variants); ``curves`` are ``progress_curves``'s."""
    baseline = YARDSTICK_TEXT[yardstick]
    first_onsets = {p: result.onsets[source][p][: first.n_members] for p in curves}
    title = f"{source} progress per primitive ({first.n_members} members, t{round(level * 100)} marked)"
    figures = [plot_progress(curves, first_onsets, out / "progress.png", title, baseline=baseline)]
    both = {
        p: {s: c for s in ("weight", "probe") if (c := progress_or_none(first, p, s, yardstick)) is not None}
        for p in result.primitives
    }
    figures.append(plot_weight_vs_probe(both, out / "weight_vs_probe.png", baseline))
    (out / "ordering_dag.png").unlink(missing_ok=True)  # a figure of an earlier analysis here
    if result.ordering.dag:  # no edge: no figure, whose stacked nodes would read as an order
        figures.append(
            plot_dag(
                [*result.primitives, *result.switches],  # switches are events of the ordering too
                list(result.ordering.dag),
                out / "ordering_dag.png",
                dag_labels(result.ordering),
            )
        )
    if variants:
        baselines = first.baselines(yardstick)
        drawn = {}
        for timeline in variants:
            kind, primitives = variant_of(timeline)
            label = f"{kind.replace('knock', 'knock-')} {'+'.join(primitives)}"
            drawn[label] = (
                {
                    p: primitive_progress(timeline, p, source, yardstick, baselines)
                    for p in curves
                    if progress_or_none(timeline, p, source, yardstick) is not None
                },
                switch_step_of(timeline),
                window_of(timeline),
            )
        figures.append(plot_variants(curves, drawn, out / "variants.png", baseline))
    return figures
