"""Stages of training as a whole: a latent-state model of the metric trajectories.

After Hu, Saphra et al. (2023, "Latent state models of training dynamics", arXiv 2308.09543):
each member's training is a sequence of metric vectors, a Gaussian HMM is fitted to the
sequences of all members (and runs) pooled, as Hu et al. pool seeds, and each member's Viterbi
path is its sequence of stages. Conventions, stated once:

- Time is log(step + 1), as for onsets. The rows (every step, every diagnostics step, every
  probe step) are first averaged into ``n_bins`` bins evenly spaced in log(step + 1) (an empty
  bin of a sparse group takes the group's value interpolated in log-step), since ~1000
  autocorrelated per-step rows would make BIC pick the largest state count.
- Features: per primitive its weight progress and its probe progress (the curves the onsets
  use, on the same yardstick), and log(1 + norm) of the weight norms of the diagnostics group,
  per layer (the mean over its heads of each of qk1, qk2 and ov) and for the whole model (direct
  path, all weights). Not log(norm): W_O starts at zero, so the OV and direct-path norms are 0
  at step 0, and the log of a floor there would outweigh the whole run. The training loss is
  left out: it jumps by construction when the data change (a curriculum switch), and the point
  is to find stages from the model alone. Standardised per feature over all members and bins,
  then optionally reduced by PCA.
- Gaussian HMM with diagonal covariances (hmmlearn), the number of states chosen by BIC over a
  range, the best of several restarts (random initialisations) per state count.
- States are numbered by the median over members of the first bin each member is in them (a
  member that never visits a state counts as the last bin plus one), so state 0 is where training
  starts. A state count that cannot be fitted is listed with its reason (``StageFit.failed``),
  never dropped silently. A *boundary* is a bin where a member's Viterbi state changes; its step
  is the geometric midpoint of the two bins' steps.
- A boundary's *jump* is how far the member's features move between the two bins (root mean
  square over features, standard units), divided by the median move between neighbouring bins
  in the ``SHARP_WINDOW`` bins on either side. A state boundary also cuts a smooth drift (a
  weight norm growing like log step is split into states wherever the fit puts them), where the
  jump is about 1; one that a sudden event makes (a curriculum switch) stands out of its
  neighbourhood. A boundary with a jump of at least ``SHARP`` is *sharp*.
- A *detour* state (Hu et al.) is one that at least one member, but fewer than half, visit.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from analysis.onset import Onset, primitive_progress

NEAR_ONSET = 0.3  # log-steps: a boundary this close to a primitive's median onset is "at" it
SHARP = 2.5  # a boundary whose jump is this many times its neighbourhood's typical move is sharp
SHARP_WINDOW = 4  # bins on either side that set a boundary's neighbourhood
N_BINS = 80  # log-step bins: 0.08 log-steps wide over 500 steps, finer than the 0.1 a switch is placed to
MAX_STATES = 12  # the largest state count BIC is offered


@dataclass(frozen=True)
class StageData:
    """Metric trajectories on a common log-step grid."""

    steps: np.ndarray  # (bin,) the bins' mean steps
    values: np.ndarray  # (sequence, bin, feature), raw (not standardised)
    features: list[str]
    sequences: list[str]  # one label per sequence, e.g. "run/member 3"


@dataclass(frozen=True)
class Boundary:
    sequence: int
    step: float
    before: int  # state before the boundary
    after: int
    jump: float = float("nan")  # the features' move across it over its neighbourhood's typical move

    @property
    def sharp(self) -> bool:
        return bool(self.jump >= SHARP)


@dataclass(frozen=True)
class Transition:
    """One kind of state change, pooled over the sequences that make it."""

    before: int
    after: int
    n_sequences: int
    median_step: float
    n_sharp: int  # sequences where this transition is a sharp boundary
    top_features: list[tuple[str, float]]  # (feature, change of the state mean in standard units)
    nearest_onset: tuple[str, float] | None = None  # (primitive, log-step distance, signed)


@dataclass
class StageFit:
    n_states: int
    bic: dict[int, float]  # state count -> BIC of its best restart
    transition_matrix: np.ndarray  # (state, state), states renumbered
    means: np.ndarray  # (state, feature) in standard units (after undoing PCA where used)
    states: np.ndarray  # (sequence, bin) Viterbi state
    data: StageData
    boundaries: list[Boundary] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    detours: dict[int, list[int]] = field(default_factory=dict)  # state -> sequences visiting it
    convergence_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (sequence,)
    failed: dict[int, str] = field(default_factory=dict)  # state count -> why it has no fit


def on_grid(steps: np.ndarray, values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Average rows (N, ...) into bins with ``edges`` (bin + 1,) in log(step + 1); a bin with no
    row takes the rows' value linearly interpolated in log-step at the bin's centre."""
    x = np.log1p(np.asarray(steps, dtype=np.float64))
    values = np.asarray(values, dtype=np.float64)
    n_bins = len(edges) - 1
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n_bins - 1)
    flat = values.reshape(len(x), -1)
    out = np.empty((n_bins, flat.shape[1]))
    centres = (edges[:-1] + edges[1:]) / 2
    for b in range(n_bins):
        rows = flat[which == b]
        rows = rows[np.isfinite(rows).all(axis=1)] if len(rows) else rows
        if len(rows):
            out[b] = rows.mean(axis=0)
        else:
            for column in range(flat.shape[1]):
                ok = np.isfinite(flat[:, column])
                out[b, column] = np.interp(centres[b], x[ok], flat[ok, column]) if ok.any() else np.nan
    return out.reshape(n_bins, *values.shape[1:])


def _norm_families(timeline) -> dict[str, list[str]]:
    """The diagnostics' weight norms, one feature per layer and kind (the mean over the layer's
    heads, e.g. ``model/L0/ov_norm``) and the whole model's (``model/all/*``), so a model with
    many heads does not outweigh the primitives' progress."""
    families: dict[str, list[str]] = {}
    for name in timeline.names("model/*_norm", group="diagnostics"):
        _, where, kind = name.split("/")
        layer = where.split("H")[0] if where.startswith("L") else where
        families.setdefault(f"model/{layer}/{kind}", []).append(name)
    return families


def stage_data(timelines: list, n_bins: int = N_BINS, yardstick: str = "blind") -> StageData:
    """The stage features of every member of every timeline on one log-step grid (the
    timelines must share primitives and cover the same steps: runs of one config)."""
    first = timelines[0]
    primitives = [p for p in first.label_names if p != "start"]
    last_step = min(int(t.steps(next(iter(t.groups))).max()) for t in timelines)
    densest = min(max(int((g.steps <= last_step).sum()) for g in t.groups.values()) for t in timelines)
    n_bins = max(2, min(n_bins, densest))  # no more bins than rows: a bin must hold data
    edges = np.linspace(0.0, math.log1p(last_step), n_bins + 1)
    centres = np.expm1((edges[:-1] + edges[1:]) / 2)
    per_run, features = [], None
    for timeline in timelines:
        columns, names = [], []
        for source in ("weight", "probe"):
            for primitive in primitives:
                try:
                    steps, progress = primitive_progress(timeline, primitive, source, yardstick)
                except KeyError:
                    continue
                keep = steps <= last_step
                columns.append(on_grid(steps[keep], progress[keep], edges))  # (bin, member)
                names.append(f"{source}:{primitive}")
        for name, heads in _norm_families(timeline).items():
            steps = timeline.steps(heads[0])
            keep = steps <= last_step
            mean = np.mean([timeline.values(h)[keep] for h in heads], axis=0)
            columns.append(on_grid(steps[keep], np.log1p(mean), edges))
            names.append(f"log1p {name}")
        if features is None:
            features = names
        elif names != features:
            raise ValueError(f"{timeline.path}: its stage features differ from {first.path}'s")
        per_run.append(np.stack(columns, axis=-1).transpose(1, 0, 2))  # (member, bin, feature)
    values = np.concatenate(per_run)
    labels = [
        f"{t.path.parent.name or t.path.stem}/member {m}" if len(timelines) > 1 else f"member {m}"
        for t in timelines
        for m in range(t.n_members)
    ]
    return StageData(centres, values, features or [], labels)


def fit_stages(
    data: StageData,
    state_counts: range = range(1, MAX_STATES + 1),
    restarts: int = 5,
    n_components: int | None = None,
    seed: int = 0,
    n_iter: int = 200,
) -> StageFit:
    """Fit Gaussian HMMs with each number of states, keep the one BIC prefers, and decode every
    sequence (Viterbi). ``n_components``: reduce the standardised features by PCA first."""
    from hmmlearn.hmm import GaussianHMM

    logging.getLogger("hmmlearn").setLevel(logging.ERROR)  # per-iteration chatter; the score decides

    values = data.values  # (sequence, bin, feature)
    n_seq, n_bins, n_feat = values.shape
    flat = values.reshape(-1, n_feat)
    keep = np.isfinite(flat).all(axis=0) & (np.nanstd(flat, axis=0) > 0)
    flat = flat[:, keep]
    features = [f for f, k in zip(data.features, keep) if k]
    if not features:
        raise ValueError("stages: no feature varies over training")
    mean, scale = flat.mean(axis=0), flat.std(axis=0)
    standard = (flat - mean) / scale
    basis = np.eye(standard.shape[1])
    if n_components is not None and n_components < standard.shape[1]:
        _, _, vt = np.linalg.svd(standard - standard.mean(axis=0), full_matrices=False)
        basis = vt[:n_components].T  # (feature, component)
    X = standard @ basis
    lengths = [n_bins] * n_seq
    rng = np.random.default_rng(seed)
    best_by_count, bic, failed = {}, {}, {}
    for n_states in state_counts:
        if n_states * 2 > len(X):
            failed[n_states] = f"not tried: it needs at least {2 * n_states} rows, the data has {len(X)}"
            continue
        best, best_score, errors = None, -np.inf, []
        for restart in range(restarts):
            model = GaussianHMM(
                n_components=n_states,
                covariance_type="diag",
                n_iter=n_iter,
                random_state=int(rng.integers(2**31 - 1)),
                min_covar=1e-3,
                init_params="stc",  # the means are ours: k-means (hmmlearn's default) costs 10x the fit
            )
            model.means_ = _initial_means(X.reshape(n_seq, n_bins, -1), n_states, restart, rng)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence chatter; the score decides
                try:
                    model.fit(X, lengths)
                    score = model.score(X, lengths)
                except ValueError as error:  # a degenerate start (e.g. an empty state)
                    errors.append(str(error).split("\n")[0])
                    continue
            if not np.isfinite(score):
                errors.append("a non-finite likelihood")
            elif score > best_score:
                best, best_score = model, score
        if best is not None:
            best_by_count[n_states], bic[n_states] = best, float(best.bic(X, lengths))
        else:
            reasons = "; ".join(sorted(set(errors)))
            failed[n_states] = f"every one of {restarts} restarts failed ({reasons})"
    if not bic:
        why = "; ".join(f"{k}: {v}" for k, v in failed.items())
        raise ValueError(f"stages: no hidden Markov model could be fitted ({why})")
    n_states = min(bic, key=bic.get)
    model = best_by_count[n_states]
    raw_states = model.predict(X, lengths).reshape(n_seq, n_bins)
    # renumber by the median over members of the first bin in the state (never: n_bins), so state 0
    # is where training starts
    first_visit = [
        np.median([np.flatnonzero(row == s)[0] if (row == s).any() else n_bins for row in raw_states])
        for s in range(n_states)
    ]
    order = np.argsort(first_visit, kind="stable")
    rename = np.empty(n_states, dtype=np.int64)
    rename[order] = np.arange(n_states)
    states = rename[raw_states]
    means = (model.means_ @ basis.T)[order]  # (state, feature) in standard units
    fit = StageFit(
        n_states=n_states,
        bic=bic,
        transition_matrix=model.transmat_[np.ix_(order, order)],
        means=means,
        states=states,
        data=StageData(data.steps, data.values[:, :, keep], features, data.sequences),
        failed=failed,
    )
    _describe(fit)
    return fit


def _initial_means(X: np.ndarray, n_states: int, restart: int, rng: np.random.Generator) -> np.ndarray:
    """Starting state means from X (sequence, bin, feature): the first restart splits training
    into equal stretches of log-step and takes each stretch's mean (training moves forward);
    later ones run k-means from k-means++ seeds (Arthur and Vassilvitskii 2007), a few Lloyd
    iterations in numpy."""
    if restart == 0:
        return np.stack([part.mean(axis=(0, 1)) for part in np.array_split(X, n_states, axis=1)])
    flat = X.reshape(-1, X.shape[-1])
    centres = [flat[rng.integers(len(flat))]]
    for _ in range(1, n_states):
        distance = np.min([((flat - c) ** 2).sum(axis=1) for c in centres], axis=0)
        total = distance.sum()
        pick = rng.choice(len(flat), p=distance / total) if total > 0 else rng.integers(len(flat))
        centres.append(flat[pick])
    centres = np.stack(centres)
    for _ in range(20):
        nearest = np.argmin(((flat[:, None] - centres[None]) ** 2).sum(axis=2), axis=1)
        moved = np.stack(
            [flat[nearest == k].mean(axis=0) if (nearest == k).any() else centres[k] for k in range(n_states)]
        )
        if np.allclose(moved, centres):
            break
        centres = moved
    return centres


def _describe(fit: StageFit, n_top: int = 3) -> None:
    """Boundaries, the transitions they make with the features that change most, detour states
    and each sequence's convergence step (where it enters its last state)."""
    log_steps = np.log1p(fit.data.steps)
    flat = fit.data.values.reshape(-1, fit.data.values.shape[-1])
    standard = (fit.data.values - flat.mean(axis=0)) / flat.std(axis=0)  # (sequence, bin, feature)
    moves = np.sqrt((np.diff(standard, axis=1) ** 2).mean(axis=2))  # (sequence, bin - 1)
    for sequence, row in enumerate(fit.states):
        for b in np.flatnonzero(np.diff(row)):
            step = float(np.expm1((log_steps[b] + log_steps[b + 1]) / 2))
            around = np.r_[
                moves[sequence, max(0, b - SHARP_WINDOW) : b], moves[sequence, b + 1 : b + 1 + SHARP_WINDOW]
            ]
            typical = float(np.median(around)) if len(around) else float("nan")
            jump = float(moves[sequence, b] / typical) if typical > 0 else float("inf")
            fit.boundaries.append(Boundary(sequence, step, int(row[b]), int(row[b + 1]), jump))
    kinds: dict[tuple[int, int], list[Boundary]] = {}
    for boundary in fit.boundaries:
        kinds.setdefault((boundary.before, boundary.after), []).append(boundary)
    for (before, after), found in sorted(kinds.items(), key=lambda kv: np.median([b.step for b in kv[1]])):
        change = fit.means[after] - fit.means[before]
        top = [(fit.data.features[i], float(change[i])) for i in np.argsort(-np.abs(change))[:n_top]]
        fit.transitions.append(
            Transition(
                before,
                after,
                len({b.sequence for b in found}),
                float(np.median([b.step for b in found])),
                len({b.sequence for b in found if b.sharp}),
                top,
            )
        )
    n_seq = len(fit.states)
    for state in range(fit.n_states):
        visitors = [s for s, row in enumerate(fit.states) if (row == state).any()]
        if 0 < len(visitors) < n_seq / 2:
            fit.detours[state] = visitors
    last = [np.flatnonzero(np.diff(row))[-1] + 1 if np.diff(row).any() else 0 for row in fit.states]
    fit.convergence_steps = fit.data.steps[np.array(last, dtype=np.int64)]


def near_onsets(fit: StageFit, onsets: dict[str, list[Onset]]) -> StageFit:
    """Each transition beside the nearest primitive's median onset (uncensored onsets only):
    (primitive, log(boundary step + 1) - log(onset + 1))."""
    medians = {}
    for primitive, found in onsets.items():
        formed = [o.step for o in found if not o.censored]
        if formed:
            medians[primitive] = float(np.median(np.log1p(formed)))
    for i, transition in enumerate(fit.transitions):
        if medians:
            here = math.log1p(transition.median_step)
            name = min(medians, key=lambda p: abs(here - medians[p]))
            fit.transitions[i] = Transition(
                **{**transition.__dict__, "nearest_onset": (name, here - medians[name])}
            )
    return fit
