"""The report's stages section (analysis/stages.py): states, transitions, their figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.onset import Onset
from analysis.plots import (
    plot_essential_dynamics,
    plot_stages,
)
from analysis.stages import (
    MAX_STATES,
    N_BINS,
    NEAR_ONSET,
    SHARP,
    StageFit,
    fit_stages,
    near_onsets,
    stage_data,
)
from devinterp.store.timeline import Timeline


def stages_section(
    full: list[Timeline],
    onsets: dict[str, list[Onset]],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    out: Path,
    yardstick: str,
    n_bins: int = N_BINS,
    max_states: int = MAX_STATES,
) -> tuple[list[str], list[Path], StageFit | None]:
    """The latent-state model of the full runs (analysis.stages) and essential dynamics of the
    first run's snapshots: the report's lines and figures."""
    lines = ["## Stages of training", ""]
    try:
        data = stage_data(full, n_bins=n_bins, yardstick=yardstick)
        fit = near_onsets(fit_stages(data, state_counts=range(1, max_states + 1)), onsets)
    except (ValueError, KeyError) as error:
        return lines + [f"No latent-state model: {error}.", ""], [], None
    bic = ", ".join(f"{k}: {v:.0f}" for k, v in fit.bic.items())
    lines += [
        f"A Gaussian HMM (Hu, Saphra et al. 2023) on {len(fit.data.features)} standardised features "
        f"({', '.join(fit.data.features)}; the training loss left out), {len(fit.data.steps)} log-step bins, "
        f"{len(fit.states)} members pooled. BIC picks **{fit.n_states} states** (BIC by state count: {bic}). "
        "States are numbered by the median over members of the first bin each member is in them (a "
        "member that never visits one counts as the run's end)."
        + "".join(f" {k} states: no fit, {why}." for k, why in sorted(fit.failed.items()))
        + (
            f" The count is the largest {'fitted' if fit.failed else 'tried'}: more states may fit "
            "better, so read them as a lower bound (`--max-states` offers more)."
            if fit.n_states == max(fit.bic)
            else ""
        ),
        "",
        f"A boundary is *sharp* where the members' features move at least {SHARP:g} times as far "
        "between its two bins as between neighbouring bins (a sudden change, such as a curriculum "
        "switch); the others cut a gradual change into states.",
        "",
        "| transition | members | sharp in | median step | nearest primitive onset (log-steps) | features "
        "that change most (standard units) |",
        "|---|---|---|---|---|---|",
    ]
    lines += transition_lines(fit)
    figures = [
        plot_stages(
            curves,
            onsets,
            fit.data.steps,
            fit.states,
            fit.data.sequences,
            out / "stages.png",
            f"latent states ({fit.n_states}, BIC) under the primitives' progress",
        )
    ]
    lines += ["", "Figure stages.png: the primitives' progress above every member's state sequence.", ""]
    dynamics_lines, dynamics_figures = essential_dynamics_section(full[0], onsets, out)
    lines += dynamics_lines
    figures += dynamics_figures
    return lines, figures, fit


def transition_lines(fit: StageFit) -> list[str]:
    """The transitions' table, the transition matrix, the transitions no onset explains and the
    detour states."""
    lines = []
    unplanted = []
    for t in fit.transitions:
        near = "" if t.nearest_onset is None else f"{t.nearest_onset[0]} ({t.nearest_onset[1]:+.2f})"
        if t.nearest_onset is None or abs(t.nearest_onset[1]) > NEAR_ONSET:
            unplanted.append(t)
        top = ", ".join(f"{name} {change:+.1f}" for name, change in t.top_features)
        counts = f"{t.n_sequences} | {t.n_sharp} | {t.median_step:.0f}"
        lines.append(f"| {t.before} -> {t.after} | {counts} | {near} | {top} |")
    matrix = ["| from \\ to | " + " | ".join(map(str, range(fit.n_states))) + " |"]
    matrix.append("|---" * (fit.n_states + 1) + "|")
    for i, row in enumerate(fit.transition_matrix):
        matrix.append(f"| {i} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    lines += ["", "Transition matrix (per bin):", "", *matrix, ""]
    if unplanted:
        lines.append(
            "Transitions with no primitive onset within "
            f"{NEAR_ONSET} log-steps (a stage no primitive explains): "
            + ", ".join(f"{t.before} -> {t.after} at step {t.median_step:.0f}" for t in unplanted)
            + "."
        )
    else:
        lines.append(f"Every transition lies within {NEAR_ONSET} log-steps of a primitive's median onset.")
    if fit.detours:
        for state, visitors in fit.detours.items():
            who = ", ".join(
                f"{fit.data.sequences[v]} (converges at step {fit.convergence_steps[v]:.0f})"
                for v in visitors
            )
            others = np.median([c for i, c in enumerate(fit.convergence_steps) if i not in visitors])
            lines.append(
                f"Detour: state {state} is visited by {len(visitors)} of {len(fit.states)} members: {who}; "
                f"the others converge at a median step of {others:.0f}."
            )
    else:
        lines.append("No detour state: every state is visited by at least half the members, or by none.")
    return lines


def essential_dynamics_section(
    first: Timeline, onsets: dict[str, list[Onset]], out: Path
) -> tuple[list[str], list[Path]]:
    """Essential dynamics of the first run's snapshots (analysis/essential_dynamics.py): its lines
    and figure, or why there are none."""
    try:
        from analysis.essential_dynamics import essential_dynamics

        dynamics = essential_dynamics(first)
    except KeyError as error:
        return [f"No essential dynamics: {error}.", ""], []
    medians = {
        p: float(np.median([o.step for o in v if not o.censored]))
        for p, v in onsets.items()
        if any(not o.censored for o in v)
    }
    figure = plot_essential_dynamics(
        dynamics.steps, dynamics.coords, dynamics.explained, medians, out / "essential_dynamics.png"
    )
    share = ", ".join(f"{e:.0%}" for e in dynamics.explained)
    lines = [
        f"Essential dynamics (Hoogland et al. 2024): the outputs on 32 fixed sequences at the "
        f"{len(dynamics.steps)} weight snapshots of {first.run_name}, PCA "
        f"over snapshots and members together; the first components explain {share} of the variance "
        "(figure essential_dynamics.png, primitives' median onsets marked).",
        "",
    ]
    return lines, [figure]
