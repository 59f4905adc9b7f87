"""The report's learning-coefficient sections (analysis/learning_coefficient.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from analysis.onset import Onset
from analysis.plots import (
    plot_llc,
)
from devinterp.store.timeline import Timeline


def llc_section(
    timeline: Timeline, onsets: dict[str, list[Onset]], out: Path
) -> tuple[list[str], list[Path]]:
    """The run's LLC estimates (``RUN/llc.h5``, from ``devinterp llc``): curves, their critical
    points beside the primitives' onsets, and the chains that went wrong."""
    from analysis.learning_coefficient import (
        MIN_POINTS,
        SMOOTH,
        critical_points,
        median_curve,
        smoothed,
    )
    from devinterp.store.llc_file import FILENAME, load_llc

    path = timeline.path.parent / FILENAME
    if not path.exists():
        return [], []
    estimates = load_llc(path)
    medians = {
        p: float(np.median(np.log1p([o.step for o in v if not o.censored])))
        for p, v in onsets.items()
        if any(not o.censored for o in v)
    }
    lines = [
        "## Learning coefficient",
        "",
        f"Local learning coefficients from {path.name} (devinterp llc): the median over members per "
        f"snapshot (estimates below 0, where the chains fell below L(w*), left out), smoothed over "
        f"{SMOOTH} log-steps where at least {MIN_POINTS} snapshots lie within {2 * SMOOTH:g} log-steps "
        "(elsewhere there is no smoothed curve: too few points to show a turn); critical points are "
        "where the smoothed curve turns (Hoogland et al. 2024), each beside the nearest primitive onset "
        "(log-steps).",
        "",
        "| refinement | snapshots | last step: median [IQR] | estimates below 0 | chains diverged | critical "
        "points (step: nearest onset) |",
        "|---|---|---|---|---|---|",
    ]
    curves = {}
    for name, found in estimates.items():
        steps, llc = found["steps"], found["llc"]
        median = median_curve(found)
        grid, smooth = smoothed(steps, median)
        curves[name] = (steps, llc, np.stack([grid, smooth]) if len(grid) else np.zeros((2, 0)))
        points = []
        for point in critical_points(name, steps, median):
            here = math.log1p(point.step)
            near = min(medians, key=lambda p: abs(here - medians[p])) if medians else None
            where = f"{near} {here - medians[near]:+.2f}" if near else "no onset"
            points.append(f"{point.kind} at {point.step:.0f}: {where}")
        last = llc[-1][np.isfinite(llc[-1])]
        quartiles = np.percentile(last, [25, 50, 75]) if len(last) else [math.nan] * 3
        lines.append(
            f"| {name} | {int(np.isfinite(llc).any(axis=1).sum())} | {quartiles[1]:.3g} [{quartiles[0]:.3g}, "
            f"{quartiles[2]:.3g}] | {int((llc < 0).sum())} of {int(np.isfinite(llc).sum())} | "
            f"{int(found['diverged'].sum())} | "
            f"{'; '.join(points) or 'none'} |"
        )
    step_sizes = {
        name: sorted({float(e) for e in found.get("eps", []) if np.isfinite(e)})
        for name, found in estimates.items()
    }
    if len({tuple(sizes) for sizes in step_sizes.values()}) > 1:  # --eps-for: say which eps made which curve
        lines += [
            "",
            "SGLD step sizes: "
            + "; ".join(f"{name} {', '.join(f'{e:g}' for e in sizes)}" for name, sizes in step_sizes.items())
            + ".",
        ]
    figure = plot_llc(curves, onsets, out / "llc.png", f"LLC over training ({timeline.path.parent.name})")
    lines += ["", "Figure llc.png: the LLC curves beside the primitives' onsets.", ""]
    role_lines, role_figures = llc_roles_section(timeline, estimates, onsets, out)
    return lines + role_lines, [figure, *role_figures]


def llc_roles_section(
    timeline: Timeline, estimates: dict, onsets: dict[str, list[Onset]], out: Path
) -> tuple[list[str], list[Path]]:
    """Head-refined LLCs by the role each head plays in its member (analysis.learning_coefficient
    .head_roles) against that member's heads with no role; ``llc_heads.png``."""
    from analysis.learning_coefficient import OTHERS, head_roles, role_curves

    roles = head_roles(timeline)
    curves = role_curves(estimates, roles)
    if not curves:
        return [], []
    steps, others = curves[OTHERS]
    lines = [
        "### Heads by role",
        "",
        "Per member, at the last diagnostics row: the head with the largest attribution share of each "
        "primitive's logit, and the layer-0 head with the highest previous-token score; 'other heads' is "
        "the member's median over its heads with no role. Wang et al. (2024) found induction-type heads "
        "end with lower refined LLCs than n-gram heads.",
        "",
        "| role | head per member | last snapshot: median [IQR] | members below their other heads |",
        "|---|---|---|---|",
    ]
    for role, (_, llc) in curves.items():
        finite = np.flatnonzero(np.isfinite(llc).all(axis=1) & np.isfinite(others).all(axis=1))
        if not len(finite):
            continue
        last = llc[finite[-1]]
        quartiles = np.percentile(last, [25, 50, 75])
        below = "" if role == OTHERS else f"{int((last < others[finite[-1]]).sum())} of {len(last)}"
        heads = ", ".join(roles.get(role, [])) or "(median of the rest)"
        lines.append(
            f"| {role} | {heads} | {quartiles[1]:.3g} [{quartiles[0]:.3g}, {quartiles[2]:.3g}] "
            f"(step {int(steps[finite[-1]])}) | {below} |"
        )
    figure = plot_llc(
        {role: (steps_, llc, np.zeros((2, 0))) for role, (steps_, llc) in curves.items()},
        {},
        out / "llc_heads.png",
        f"Head-refined LLC by role ({timeline.path.parent.name})",
    )
    return lines + ["", "Figure llc_heads.png: the head-refined LLC of each role's heads.", ""], [figure]
