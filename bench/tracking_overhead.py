"""Cost of tracking: the platform with everything on against a bare PyTorch loop.

Same model (the quickstart's: 4 members, 2 layers, d_model 64, batch 32 x 64 tokens), the same
data generation and the same steps, timed after a warm-up:
  bare      a plain loop: sample, forward, backward, AdamW step
  lightning the same through Lightning with no tracking at all (Lightning's own cost)
  tracked   Lightning with weight metrics every step, diagnostics (with the attribution and
            composition groups) every 10 steps, the HDF5 timeline and W&B offline, no probes
  no attribution  the same without the attribution group (--circuits.attribution false)
  +probes   the same plus probe evaluation every 10 steps
Configurations are interleaved and repeated; each figure is the median over repeats (these
machines are noisy: single runs of the same loop differ by up to 30%, so a minimum rewards
whichever configuration got a lucky run). Prints the
step-time ratios (targets: tracked <= 1.10, +probes <= 1.15) and one weight snapshot's cost as a
fraction of one bare training step.

    python bench/tracking_overhead.py [--steps 90] [--members 4] [--repeats 5]
"""

from __future__ import annotations

import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, load_run_config, report  # noqa: E402

from callbacks import CircuitMetrics, ProbeMetrics, TimelineWriter  # noqa: E402
from devinterp.data import MemberStreams, ToyLanguageData  # noqa: E402
from devinterp.module import TensorTransformerModule  # noqa: E402


class StepClock(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of training."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.end = time.perf_counter()


def make(members: int, config: str = "quickstart", compile: bool = False):
    """The data and model of configs/<config>.yaml with ``members`` members."""
    cfg = load_run_config(config)
    data = ToyLanguageData(
        language=str(ROOT / cfg["data"]["language"]),
        seq_len=cfg["data"]["seq_len"],
        batch_size=cfg["data"]["batch_size"],
        n_members=members,
        seed=0,
        probe_size=cfg["data"]["probe_size"],
        steps_per_block=cfg["data"].get("steps_per_block", 16),
    )
    model_args = {k: v for k, v in cfg["model"].items() if k not in ("n_members", "seed")}
    module = TensorTransformerModule(
        d_vocab=data.d_vocab,
        n_ctx=data.seq_len,
        label_names=data.label_names,
        n_members=members,
        seed=0,
        compile=compile,
        **model_args,
    )
    return data, module


def bare_steps(members: int):
    """The bare loop (sample, forward, backward, AdamW) on the quickstart's model with ``members``
    members, as an endless generator of step times (seconds)."""
    data, module = make(members)
    optimizer = torch.optim.AdamW(module.parameters(), lr=module.hparams.lr, fused=True)  # as the module's
    stream = iter(
        MemberStreams(data.language, data.seq_len, data.batch_size, data.stream_seeds, data.steps_per_block)
    )
    while True:
        start = time.perf_counter()
        batch = next(stream)
        optimizer.zero_grad(set_to_none=True)
        member_loss, _ = module.member_losses(batch["tokens"], batch["labels"])
        member_loss.sum().backward()
        optimizer.step()
        yield time.perf_counter() - start


def bare_seconds_per_step(members: int, steps: int, warmup: int) -> float:
    loop = bare_steps(members)
    times = [next(loop) for _ in range(steps)]
    return sum(times[warmup:]) / (steps - warmup)


def tracked_seconds_per_step(
    members: int,
    steps: int,
    warmup: int,
    probes: bool,
    tracking: bool = True,
    config: str = "quickstart",
    probe_every: int = 10,
    first_callbacks: list | None = None,
    attribution: bool = True,
) -> float:
    from lightning.pytorch.loggers import WandbLogger

    data, module = make(members, config)
    clock = StepClock(warmup)
    with tempfile.TemporaryDirectory() as root:
        callbacks = [clock, *(first_callbacks or [])]
        if tracking:
            callbacks.append(
                CircuitMetrics(
                    diagnostics_every_n_steps=10,
                    diagnostics_schedule="every_n_steps",
                    attribution=attribution,
                )
            )
        if probes:
            callbacks.append(ProbeMetrics(every_n_steps=probe_every, schedule="every_n_steps"))
        if tracking:
            callbacks.append(TimelineWriter(flush_every_n_steps=100))
        logger = WandbLogger(save_dir=root, project="bench", mode="offline") if tracking else False
        trainer = L.Trainer(
            max_steps=steps,
            default_root_dir=root,
            logger=logger,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            accelerator="cpu",
        )
        trainer.fit(module, datamodule=data)
        if logger:
            logger.experiment.finish()
    return (clock.end - clock.start) / (steps - warmup)


def snapshot_fraction(members: int, bare_step: float) -> float:
    """One weight snapshot (every parameter to the host and into the file) over one bare step."""
    import h5py
    import numpy as np

    _, module = make(members)
    with tempfile.TemporaryDirectory() as root:
        with h5py.File(Path(root) / "s.h5", "w") as f:
            datasets = {
                n: f.create_dataset(n, shape=(4, *p.shape), dtype=np.float32)
                for n, p in module.model.named_parameters()
            }
            start = time.perf_counter()
            for slot in range(4):
                for name, param in module.model.named_parameters():
                    datasets[name][slot] = param.detach().float().cpu().numpy()
            return (time.perf_counter() - start) / 4 / bare_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    times = {"bare": [], "lightning": [], "no attribution": [], "tracked": [], "+probes": []}
    for _ in range(args.repeats):
        times["bare"].append(bare_seconds_per_step(args.members, args.steps, args.warmup))
        times["lightning"].append(
            tracked_seconds_per_step(args.members, args.steps, args.warmup, probes=False, tracking=False)
        )
        times["no attribution"].append(
            tracked_seconds_per_step(args.members, args.steps, args.warmup, probes=False, attribution=False)
        )
        times["tracked"].append(tracked_seconds_per_step(args.members, args.steps, args.warmup, probes=False))
        times["+probes"].append(tracked_seconds_per_step(args.members, args.steps, args.warmup, probes=True))
    best = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"quickstart size, {args.members} members, {args.steps - args.warmup} timed steps, "
        f"median of {args.repeats}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'configuration':<15}{'ms/step':>10}{'ratio':>8}{'target':>8}")
    rows = (
        ("bare", ""),
        ("lightning", ""),
        ("no attribution", ""),
        ("tracked", "<= 1.10"),
        ("+probes", "<= 1.15"),
    )
    for name, target in rows:
        print(f"{name:<15}{best[name] * 1000:>10.1f}{best[name] / best['bare']:>8.3f}{target:>8}")
    snapshot = snapshot_fraction(args.members, best["bare"])
    print(f"one weight snapshot = {snapshot:.3f} of a training step")
    report("tracking: tracked / bare step time", best["tracked"] / best["bare"], "<= 1.10")
    report("tracking: +probes / bare step time", best["+probes"] / best["bare"], "<= 1.15")


if __name__ == "__main__":
    main()
