"""LLC curves over training and their critical points (Hoogland et al. 2024, "Loss landscape
degeneracy drives stagewise development in transformers": stage boundaries are the critical
points of the LLC against log step).

Conventions, stated once: a run's estimates are read from ``RUN/llc.h5`` (written by ``devinterp
llc``; its layout is in devinterp/cli/llc.py). A curve is the median over members at each
snapshot step, as a function of log(step + 1). It is smoothed with a Gaussian kernel of width
``SMOOTH`` log-steps (a kernel-weighted mean of the snapshots, so unevenly spaced snapshots are
fine), and a *critical point* is where its derivative in log-step changes sign: a peak (rising
then falling) or a trough, if the curve moves by at least ``PROMINENCE`` of its range between
it and its neighbouring turns. Snapshots whose estimate is negative (the chains fell below L(w*): not
at a minimum) are left out of the curve, never smoothed into it. The smoothed curve exists only
where ``MIN_POINTS`` snapshots lie within the kernel's window, so three snapshots over a whole
run give no smoothed curve and no critical point, only the points themselves.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from devinterp.store.llc_file import reportable

SMOOTH = 0.3  # log-steps: the Gaussian kernel's standard deviation
MIN_POINTS = 3  # points the smoother needs within its window (2 SMOOTH either side)
PROMINENCE = 0.1  # a turn must rise or fall by this share of the curve's range on either side


@dataclass(frozen=True)
class CriticalPoint:
    refinement: str
    step: float
    kind: str  # "peak" or "trough"
    value: float  # the smoothed LLC there


def smoothed(steps: np.ndarray, values: np.ndarray, width: float = SMOOTH, n_grid: int = 200):
    """(grid steps, smoothed values) of a curve (steps (N,), values (N,)) on an even log-step grid
    spanning the finite points; a kernel-weighted mean of the points. NaN where fewer than
    ``MIN_POINTS`` points lie within the kernel's window (2 ``width`` either side): a smoother
    drawn through sparser points invents turns the data cannot show."""
    ok = np.isfinite(values)
    x, y = np.log1p(np.asarray(steps, dtype=np.float64)[ok]), np.asarray(values, dtype=np.float64)[ok]
    if len(x) < MIN_POINTS:
        return np.zeros(0), np.zeros(0)
    grid = np.linspace(x.min(), x.max(), n_grid)
    weights = np.exp(-0.5 * ((grid[:, None] - x[None]) / width) ** 2)
    curve = (weights * y).sum(axis=1) / weights.sum(axis=1)
    enough = (np.abs(grid[:, None] - x[None]) <= 2 * width).sum(axis=1) >= MIN_POINTS
    if not enough.any():
        return np.zeros(0), np.zeros(0)
    return np.expm1(grid), np.where(enough, curve, np.nan)


def critical_points(
    name: str, steps: np.ndarray, values: np.ndarray, width: float = SMOOTH, prominence: float = PROMINENCE
) -> list[CriticalPoint]:
    """Peaks and troughs of the smoothed curve: sign changes of its derivative in log-step,
    keeping only turns that rise or fall by at least ``prominence`` times the curve's range on
    either side (smaller wiggles are noise left over by the smoothing)."""
    grid, curve = smoothed(steps, values, width)
    found = []
    finite = np.concatenate([[False], np.isfinite(curve), [False]]).astype(int)
    for start, stop in zip(np.flatnonzero(np.diff(finite) == 1), np.flatnonzero(np.diff(finite) == -1)):
        found += _turns(name, grid[start:stop], curve[start:stop], prominence)  # each dense stretch alone
    return found


def _turns(name: str, grid: np.ndarray, curve: np.ndarray, prominence: float) -> list[CriticalPoint]:
    """The prominent turns of one stretch of smoothed curve."""
    if len(curve) < 3:
        return []
    slope = np.diff(curve)
    turns = [int(i) + 1 for i in np.flatnonzero(np.sign(slope[:-1]) * np.sign(slope[1:]) < 0)]
    tolerance = prominence * float(curve.max() - curve.min())
    # the curve's extremes in order, ends included; drop the smallest swing until all are large
    points = [0, *turns, len(curve) - 1]
    while len(points) > 2:
        swings = np.abs(np.diff(curve[points]))
        k = int(np.argmin(swings))
        if swings[k] >= tolerance:
            break
        if k == 0:
            del points[1]  # a wiggle next to the start: the start stays
        elif k == len(swings) - 1:
            del points[-2]
        else:
            del points[k : k + 2]  # an interior wiggle: both its turns go, alternation kept
    found = []
    for i in points[1:-1]:
        kind = "peak" if curve[i] > curve[i - 1] else "trough"
        found.append(CriticalPoint(name, float(grid[i]), kind, float(curve[i])))
    return found


def median_curve(estimates: dict[str, np.ndarray]) -> np.ndarray:
    """(snapshot,) the median over members, with negative estimates (below L(w*)) left out."""
    llc = reportable(estimates["llc"])
    with np.errstate(all="ignore"):
        return np.array([np.nanmedian(row) if np.isfinite(row).any() else math.nan for row in llc])


PREVIOUS_TOKEN = "previous-token"
OTHERS = "other heads"


def head_roles(timeline) -> dict[str, list[str]]:
    """Role -> per member, the head that plays it at the run's last diagnostics row: for each
    primitive the attribution group splits, the head (not the direct path) with the largest share
    of its logit (analysis/shares.py); ``previous-token``, the layer-0 head with the largest
    previous-token score (diagnostics). Members carry no common head labels, so roles are per
    member. Empty without those groups."""
    from analysis.shares import component_shares, top_heads

    roles: dict[str, list[str]] = {}
    shares = component_shares(timeline)
    if shares is not None and len(shares.steps):
        top = top_heads(shares)  # (primitive, member)
        for p, primitive in enumerate(shares.primitives):
            roles[primitive] = [shares.components[c] for c in top[p]]
    group = timeline.groups.get("diagnostics")
    if group is not None and len(group.steps):
        scores = [(n, group.names.index(n)) for n in group.names if n.endswith("/prev_token")]
        if scores:
            last = np.stack([group.values[-1, i] for _, i in scores])  # (head, member)
            heads = [n.split("/")[-2] for n, _ in scores]
            roles[PREVIOUS_TOKEN] = [heads[h] for h in np.nanargmax(np.nan_to_num(last, nan=-1), axis=0)]
    return roles


def role_curves(estimates: dict[str, dict[str, np.ndarray]], roles: dict[str, list[str]]):
    """Role -> (steps (snapshot,), llc (snapshot, member)): each member's head of that role,
    its head-refined LLC; ``other heads``: per member, the median over the heads that play no
    role. Roles whose heads were not all estimated are left out; none without other heads."""
    heads = sorted(n for n in estimates if n.startswith("L") and n[1:].replace("H", "").isdigit())
    if not heads:
        return {}
    steps = estimates[heads[0]]["steps"]
    n_members = estimates[heads[0]]["llc"].shape[1]
    curves = {}
    for role, chosen in roles.items():
        if len(chosen) == n_members and all(h in estimates for h in chosen):
            curves[role] = (steps, np.stack([estimates[h]["llc"][:, m] for m, h in enumerate(chosen)], 1))
    cast = [{chosen[m] for chosen in roles.values() if len(chosen) == n_members} for m in range(n_members)]
    others = np.full((len(steps), n_members), np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a snapshot with no head estimate
        for m in range(n_members):
            rest = [estimates[h]["llc"][:, m] for h in heads if h not in cast[m]]
            if rest:
                others[:, m] = np.nanmedian(np.stack(rest, 1), axis=1)
    if not (curves and np.isfinite(others).any()):
        return {}  # nothing to compare a role with
    return {**curves, OTHERS: (steps, others)}
