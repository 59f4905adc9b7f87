"""The LLC sidecar file ``RUN/llc.h5``: written by ``devinterp llc`` (devinterp/cli/llc.py), read by
the report (analysis/learning_coefficient.py).

The estimates go to a sidecar file beside the timeline, never into it, so the training rows are
never at risk. Layout of ``llc.h5`` (rewritten whole, through a temporary file and a rename, after
every estimate, so a stopped command leaves the last complete file and a rerun with the same
settings goes on from there):

- attrs ``settings``: JSON of the sampler's hyperparameters, the members, the pool and batch size;
- ``steps`` (snapshot,): the snapshot steps estimated so far, increasing;
- per refinement R (``model``, a primitive, ``L<l>H<h>``) the group ``R`` with ``llc``,
  ``std_error``, ``init_loss`` (snapshot, member), ``diverged``, ``below_init`` (snapshot, member)
  counts of chains, ``per_chain`` (snapshot, member, chain) and ``loss_trace`` (snapshot, member,
  chain, kept draw) and ``eps`` (snapshot,), the step size it was made with (``--eps``, or its
  ``--eps-for``); NaN where that snapshot has no estimate yet.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

FILENAME = "llc.h5"


def reportable(llc: np.ndarray) -> np.ndarray:
    """Estimates as reported anywhere (the report, W&B): NaN where the chains fell below L(w*)
    (a negative estimate: not at a minimum, or eps too large) or diverged (non-finite)."""
    llc = np.asarray(llc, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(llc) & (llc >= 0), llc, np.nan)


def load_llc(run: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{refinement: {"steps" (snapshot,), "llc", "std_error", ... (snapshot, member, ...)}}."""
    path = Path(run) / FILENAME if Path(run).is_dir() else Path(run)
    with h5py.File(path, "r") as f:
        steps = f["steps"][()]
        return {
            name: {"steps": steps, **{k: v[()] for k, v in f[name].items()}} for name in f if name != "steps"
        }


def read_estimates(path: Path, settings: dict) -> dict:
    """The estimates already in ``path`` ({(step, refinement): arrays}); none if it does not exist."""
    store: dict = {}
    if not path.exists():
        return store
    with h5py.File(path, "r") as f:
        there, asked = json.loads(f.attrs["settings"]), json.loads(json.dumps(settings))
        if there != asked:
            flat = lambda d: {**d["sampler"], **{k: v for k, v in d.items() if k != "sampler"}}  # noqa: E731
            old, new = flat(there), flat(asked)
            differ = ", ".join(
                f"{k} {old.get(k)} there, {new.get(k)} asked" for k in new if old.get(k) != new[k]
            )
            raise ValueError(
                f"{path}: made with other settings ({differ}); pass the same ones, or move it away"
            )
        steps = f["steps"][()]
        for name in f:
            if name == "steps":
                continue
            group = f[name]
            for i, step in enumerate(steps):
                if np.isfinite(group["llc"][i]).any() or group["diverged"][i].any():
                    # a file from before --eps-for holds no eps: every estimate in it used --eps
                    store[(int(step), name)] = {"eps": np.float64(there["sampler"]["eps"])}
                    store[(int(step), name)].update({key: group[key][i] for key in group})
    return store


def has_estimate(store: dict, step: int, name: str) -> bool:
    return (step, name) in store


def record(store: dict, step: int, name: str, estimate) -> None:
    store[(step, name)] = {
        "llc": estimate.llc,
        "std_error": estimate.std_error,
        "init_loss": estimate.init_loss,
        "per_chain": estimate.per_chain,
        "diverged": estimate.diverged.sum(axis=1),
        "below_init": estimate.below_init.sum(axis=1),
        "loss_trace": estimate.loss_trace,
        "eps": np.float64(estimate.config.eps),
    }


def write_estimates(path: Path, store: dict, settings: dict) -> None:
    """Rewrite the whole file through a temporary one and a rename (atomic on one file system)."""
    steps = sorted({step for step, _ in store})
    names = sorted({name for _, name in store})
    partial = path.with_suffix(".h5.partial")
    with h5py.File(partial, "w") as f:
        f.attrs["settings"] = json.dumps(settings)
        f["steps"] = np.asarray(steps, dtype=np.int64)
        for name in names:
            example = next(v for (s, n), v in store.items() if n == name)
            group = f.create_group(name)
            for key, value in example.items():
                full = np.full(
                    (len(steps), *np.shape(value)), np.nan if value.dtype.kind == "f" else 0, value.dtype
                )
                for i, step in enumerate(steps):
                    if (step, name) in store:
                        full[i] = store[(step, name)][key]
                group[key] = full
    os.replace(partial, path)
