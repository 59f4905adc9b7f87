"""``devinterp analyze``: onsets, ordering, dependence, figures and a report from run folders.

Runs of the full language pool their members (each (run, member) is one unit); knock-out and
knock-in runs (recognised from their stored config) feed the dependence verdicts, and runs with
mechanism interventions the suppression verdicts. One module per section; ``write_report`` puts
them in order.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from analysis.dependence import language_of, variant_of
from analysis.report.components import attribution_section, mlp_section
from analysis.report.llc_section import llc_section
from analysis.report.mechanism import mechanism_figure, mechanism_lines
from analysis.report.ordering_section import dependence_lines, header_lines, onset_lines, ordering_lines
from analysis.report.pipeline import Analysis, analyze_timelines, find_timelines
from analysis.report.progress_figures import progress_curves, progress_figures
from analysis.report.stage_section import stages_section
from analysis.report.strategy_section import language_lines, strategy_section
from analysis.report.weight_figures import circuit_figures
from analysis.stages import MAX_STATES, N_BINS, StageFit
from devinterp.store.timeline import load_timeline

__all__ = ["Analysis", "analyze_timelines", "find_timelines", "write_report"]


def write_report(
    paths: list[str | Path],
    out: str | Path,
    level: float = 0.5,
    source: str = "probe",
    alpha: float = 0.01,
    at_steps: list[int] | None = None,
    yardstick: str = "blind",
    member: int = 0,
    stages: bool = True,
    stage_bins: int = N_BINS,
    max_states: int = MAX_STATES,
    serve_threshold: float = 0.2,
) -> Path:
    """Analyse runs and write report.md, ordering.json and the PNGs into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = find_timelines(paths)
    timelines = [load_timeline(p) for p in files]
    result = analyze_timelines(timelines, level, source, alpha, yardstick)
    full = [
        (f, t)
        for f, t in zip(files, timelines)
        if (variant_of(t)[0] == "full" and language_of(t) not in result.other_languages) or result.controls
    ]
    first = full[0][1]
    variants = [t for t in timelines if variant_of(t)[0] != "full"]
    curves = progress_curves(result, first, source, yardstick)
    figures = progress_figures(result, first, curves, variants, out, source, yardstick, level)
    figures += circuit_figures(first, out, at_steps, member)
    lines = header_lines(result, files, full, level, source, alpha, yardstick)
    lines += onset_lines(result, level, yardstick) + ordering_lines(result) + dependence_lines(result, alpha)
    lines += language_lines(result)
    strategy_lines, strategy_figures = strategy_section(result, [t for _, t in full], out)
    lines += strategy_lines
    figures += strategy_figures
    lines += mechanism_lines(result.mechanism, variants)
    if result.mechanism:
        figure, route_lines = mechanism_figure(first, variants, out, source, yardstick)
        figures.append(figure)
        lines += route_lines
    fit = None
    if stages:
        stage_lines, stage_figures, fit = stages_section(
            [t for _, t in full], result.onsets[source], curves, out, yardstick, stage_bins, max_states
        )
        lines += stage_lines
        figures += stage_figures
    component_lines, component_figures = attribution_section(first, out, serve_threshold, at_steps, member)
    lines += component_lines + mlp_section(first)
    figures += component_figures
    llc_lines, llc_figures = llc_section(first, result.onsets[source], out)
    lines += llc_lines + ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    summary = ordering_summary(result, level, source, yardstick, alpha, fit)
    (out / "ordering.json").write_text(json.dumps(summary, indent=2, default=float))
    return report


def ordering_summary(
    result: Analysis, level: float, source: str, yardstick: str, alpha: float, fit: StageFit | None
) -> dict:
    """What ordering.json holds: the settings, every onset, pair, edge, verdict and the stage fit."""
    return {
        "level": level,
        "source": source,
        "yardstick": yardstick,
        "alpha": alpha,
        "units": result.n_units,
        "onsets": {
            s: {p: [asdict(o) for o in v] for p, v in per.items()} for s, per in result.onsets.items()
        },
        "pairs": [asdict(p) for p in result.ordering.pairs],
        "edges": result.ordering.edges,
        "dag": result.ordering.dag,
        "edges_on_other_yardsticks": result.other_yardsticks,
        "lead_lag": result.lead_lag,
        "dependence": [asdict(d) for d in result.dependence],
        "mechanism": [asdict(e) for e in result.mechanism],
        "stages": None
        if fit is None
        else {
            "n_states": fit.n_states,
            "bic": fit.bic,
            "failed_fits": fit.failed,
            "features": fit.data.features,
            "bin_steps": fit.data.steps.tolist(),
            "states": fit.states.tolist(),
            "transition_matrix": fit.transition_matrix.tolist(),
            "transitions": [asdict(t) for t in fit.transitions],
            "detours": {str(k): v for k, v in fit.detours.items()},
        },
    }
