"""Essential dynamics (Hoogland et al. 2024, "Loss landscape degeneracy drives stagewise
development in transformers", arXiv 2402.02364, section 4): the model's outputs on a fixed set
of inputs at every weight snapshot, reduced by PCA over time.

Conventions: the inputs are ``n_sequences`` sequences drawn once from the run's language (a
fixed seed, independent of training), every position; the output at a position is the vector of
log-probabilities over the vocabulary, centred per position (log-probabilities minus their
mean over the vocabulary, so the trajectory does not move with a constant shift). One row per
(member, snapshot): all positions' outputs concatenated. The PCA is fitted on the rows of every
member together, so members share axes and their trajectories compare. Needs only the weight
snapshots the timeline holds (raise ``--timeline.n_snapshots``, e.g. 64, for a smooth path), no
training. Imports torch (to run the model) only when called.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devinterp.store.timeline import Timeline

INPUT_SEED = 20240205  # the probe inputs' seed: fixed, so two runs' trajectories see the same inputs


@dataclass(frozen=True)
class EssentialDynamics:
    steps: np.ndarray  # (snapshot,) the snapshots' steps, increasing
    coords: np.ndarray  # (member, snapshot, component)
    explained: np.ndarray  # (component,) fraction of the variance each component explains


def snapshot_outputs(timeline: Timeline, n_sequences: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(steps (snapshot,), outputs (member, snapshot, features)) of every written snapshot."""
    import torch

    from devinterp.restore import run_language, snapshot_model

    language = run_language(timeline)
    if language is None:
        raise KeyError(f"{timeline.path}: essential dynamics needs the run's language spec")
    slots = np.flatnonzero(timeline.snapshot_steps >= 0)
    if len(slots) < 3:
        raise KeyError(f"{timeline.path}: essential dynamics needs at least 3 weight snapshots")
    steps, outputs = [], []
    tokens = None
    for slot in slots:
        model, step = snapshot_model(timeline, int(slot))
        if tokens is None:
            sample = language.sample(n_sequences, model.cfg.n_ctx, INPUT_SEED)
            tokens = torch.from_numpy(sample.tokens).expand(model.cfg.n_members, -1, -1)
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens).double(), dim=-1)  # (member, batch, pos, vocab)
            centred = logp - logp.mean(dim=-1, keepdim=True)
        steps.append(step)
        outputs.append(centred.reshape(model.cfg.n_members, -1).numpy())
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps)[order], np.stack(outputs, axis=1)[:, order]


def principal_trajectory(outputs: np.ndarray, n_components: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """PCA of rows (member, snapshot, features) fitted on all members' rows together:
    (coords (member, snapshot, component), explained variance fractions (component,))."""
    n_members, n_snapshots, n_features = outputs.shape
    rows = outputs.reshape(-1, n_features)
    centred = rows - rows.mean(axis=0)
    # the Gram matrix is (rows x rows): small, whatever the number of output features
    gram = centred @ centred.T
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    order = np.argsort(eigenvalues)[::-1][:n_components]
    eigenvalues, eigenvectors = np.maximum(eigenvalues[order], 0.0), eigenvectors[:, order]
    coords = eigenvectors * np.sqrt(eigenvalues)  # projections onto the principal axes
    total = float(np.trace(gram)) or 1.0
    return coords.reshape(n_members, n_snapshots, -1), eigenvalues / total


def essential_dynamics(timeline: Timeline, n_sequences: int = 32, n_components: int = 3) -> EssentialDynamics:
    steps, outputs = snapshot_outputs(timeline, n_sequences)
    coords, explained = principal_trajectory(outputs, n_components)
    return EssentialDynamics(steps, coords, explained)
