"""A small golden timeline: the same tiny runs, made again, must give the stored files row for row.

The files in tests/data/golden_<language>.npz hold what ``golden_run`` (CPU, one thread) wrote:
every metric group's steps, names, metric attributes and values, and the weight snapshots
(``contents`` reads them from a timeline); ``python -m tests.helpers.golden`` writes them again. A change
that alters timeline values on purpose regenerates them and says so in its commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from callbacks import CircuitMetrics, ProbeMetrics, TimelineWriter
from tests.helpers.tiny import tiny_parts, tiny_trainer

ROOT = Path(__file__).resolve().parents[2]
LANGUAGES = {
    "seed": ROOT / "configs" / "languages" / "seed.yaml",
    "rich": ROOT / "configs" / "languages" / "rich.yaml",
}
MAX_STEPS = 14


def golden_path(name: str) -> Path:
    return ROOT / "tests" / "data" / f"golden_{name}.npz"


def golden_run(root: Path, name: str) -> Path:
    """A 2-member, 2-layer run of ``MAX_STEPS`` steps on one thread; returns its timeline."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data, module = tiny_parts(LANGUAGES[name], seed=3, mlp=name == "rich", d_mlp=16)
        callbacks = [
            CircuitMetrics(diagnostics_every_n_steps=3),
            ProbeMetrics(every_n_steps=5),
            TimelineWriter(flush_every_n_steps=4, n_snapshots=5),
        ]
        trainer = tiny_trainer(MAX_STEPS, root, callbacks, deterministic=True)
        trainer.fit(module, datamodule=data)
    finally:
        torch.set_num_threads(threads)
    return root / "timeline.h5"


def contents(path: Path) -> dict[str, np.ndarray]:
    """Every metric group's rows and attributes and every snapshot, keyed ``<group>/<field>``."""
    out = {}
    with h5py.File(path, "r") as f:
        for group in ("every_step", "diagnostics", "probe"):
            g = f[group]
            out[f"{group}/step"] = g["step"][()]
            out[f"{group}/values"] = g["values"][()]
            out[f"{group}/names"] = np.array([n.decode() for n in g["names"][()]])
            for field in ("kind", "primitive", "rule"):
                out[f"{group}/{field}"] = np.array([v.decode() for v in g["metric_info"][field][()]])
            for field in ("nothing", "learned", "sparse"):
                out[f"{group}/{field}"] = g["metric_info"][field][()]
        for name, dataset in f["snapshots"].items():
            out[f"snapshots/{name}"] = dataset[()]
    return out


if __name__ == "__main__":
    import tempfile

    for name in sys.argv[1:] or LANGUAGES:
        with tempfile.TemporaryDirectory() as folder:
            np.savez_compressed(golden_path(name), **contents(golden_run(Path(folder), name)))
        print(f"wrote {golden_path(name)} ({golden_path(name).stat().st_size // 1024} KiB)")
