"""A small golden timeline: the same tiny runs, made again, must give the stored files row for row.

The files in tests/data/golden_<language>.npz hold what ``golden_run`` (CPU, one thread) wrote:
every metric group's steps, names, metric attributes and values, and the weight snapshots
(``contents`` reads them from a timeline); ``python -m tests.golden`` writes them again. A change
that alters timeline values on purpose regenerates them and says so in its commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch

from callbacks import CircuitMetrics, ProbeMetrics, TimelineWriter
from devinterp.data import ToyLanguageData
from devinterp.module import TensorTransformerModule

ROOT = Path(__file__).resolve().parents[1]
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
        data = ToyLanguageData(
            language=str(LANGUAGES[name]),
            seq_len=16,
            batch_size=4,
            n_members=2,
            seed=3,
            probe_size=8,
            steps_per_block=4,
        )
        module = TensorTransformerModule(
            d_vocab=data.d_vocab,
            n_ctx=16,
            label_names=data.label_names,
            n_members=2,
            seed=3,
            n_layers=2,
            n_heads=2,
            d_model=16,
            d_head=8,
            mlp=name == "rich",
            d_mlp=16,
            warmup_steps=2,
        )
        callbacks = [
            CircuitMetrics(diagnostics_every_n_steps=3),
            ProbeMetrics(every_n_steps=5),
            TimelineWriter(flush_every_n_steps=4, n_snapshots=5),
        ]
        trainer = L.Trainer(
            max_steps=MAX_STEPS,
            default_root_dir=root,
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            accelerator="cpu",
            deterministic=True,
        )
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
