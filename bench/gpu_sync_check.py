"""GPU path check: no host synchronisation in a tracked training step, weights and metric
buffers on the GPU, float32 throughout.

Trains the quickstart model (4 members) on CUDA through Lightning with everything on (weight
metrics every step, diagnostics every 10, probes every 10, snapshots, the timeline, the progress
bar), with ``torch.cuda.set_sync_debug_mode("warn")`` in every step that is not a flush step,
and counts the synchronisation warnings each step raises. Prints the counts and exits 1 if a
quiet step synchronised. Without a CUDA device it says so and exits 0 (the CPU test
tests/test_host_sync.py counts host reads instead).

    python bench/gpu_sync_check.py [--steps 60] [--flush 25]
"""

from __future__ import annotations

import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

import argparse
import collections
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, load_run_config  # noqa: E402

from callbacks import CircuitMetrics, ProbeMetrics, TimelineWriter  # noqa: E402
from callbacks.progress_bar import FlushedLossBar  # noqa: E402
from devinterp.data import ToyLanguageData  # noqa: E402
from devinterp.module import TensorTransformerModule  # noqa: E402


class SyncCounter(L.Callback):
    """Counts CUDA synchronisation warnings from one step's start to the next's."""

    def __init__(self, flush: int):
        self.flush = flush
        self.step: int | None = None
        self.counts: dict[int, list[str]] = collections.defaultdict(list)
        self._catch = None

    def _stop(self) -> None:
        if self._catch is None:
            return
        torch.cuda.set_sync_debug_mode(0)
        self._catch.__exit__(None, None, None)
        self.counts[self.step] += [
            str(w.message).splitlines()[0] for w in self._log if "synchroniz" in str(w.message).lower()
        ]
        self._catch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._stop()
        self.step = trainer.global_step
        if self.step > 0:
            self._catch = warnings.catch_warnings(record=True)
            self._log = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.flush == 0:  # this step flushes: reading is its job
            self._stop()

    def on_train_end(self, trainer, pl_module):
        self._stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--flush", type=int, default=25)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_sync_check: no CUDA device here; skipped (tests/test_host_sync.py covers the CPU)")
        return 0
    cfg = load_run_config("quickstart")
    data = ToyLanguageData(
        language=str(ROOT / cfg["data"]["language"]),
        seq_len=cfg["data"]["seq_len"],
        batch_size=cfg["data"]["batch_size"],
        n_members=4,
        seed=0,
        probe_size=cfg["data"]["probe_size"],
    )
    model_args = {k: v for k, v in cfg["model"].items() if k not in ("n_members", "seed")}
    module = TensorTransformerModule(
        d_vocab=data.d_vocab,
        n_ctx=data.seq_len,
        label_names=data.label_names,
        n_members=4,
        seed=0,
        **model_args,
    )
    counter = SyncCounter(args.flush)
    circuits = CircuitMetrics(diagnostics_every_n_steps=10)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_steps=args.steps,
            default_root_dir=root,
            logger=False,
            accelerator="cuda",
            devices=1,
            callbacks=[
                counter,
                circuits,
                ProbeMetrics(every_n_steps=10, schedule="every_n_steps"),
                TimelineWriter(flush_every_n_steps=args.flush),
                FlushedLossBar(),
            ],
            enable_checkpointing=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(module, datamodule=data)
    placement = {name: (str(p.device), str(p.dtype)) for name, p in module.named_parameters()}
    wrong = {n: v for n, v in placement.items() if not v[0].startswith("cuda") or v[1] != "torch.float32"}
    quiet = {s: c for s, c in counter.counts.items() if c}
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"parameters on cuda, float32: {not wrong} {wrong if wrong else ''}")
    print(f"per-step losses kept on: {circuits.last_loss_device}")
    print(f"steps checked: {len(counter.counts)}; steps that synchronised: {len(quiet)}")
    for step, messages in sorted(quiet.items())[:5]:
        print(f"  step {step}: {len(messages)} x {messages[0]}")
    return 1 if quiet or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
