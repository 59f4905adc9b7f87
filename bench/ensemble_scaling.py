"""Ensemble scaling: many members in one process against the same members one after another.

At the quickstart's size (2 layers, d_model 64, batch 32 x 64 tokens, the seed language), one
training step (sample the batch, forward, backward, fused AdamW) of an M-member ensemble is timed
against M one-member models stepped one after another in the same process, for M = 1, 4, 16.
Start-up (model building, the first steps) is excluded; configurations are interleaved and each
figure is the median over repeats. The throughput ratio is (time of M solo steps) / (time of one
M-member step). Target on CPU: no penalty (>= 1.0x for 16 members).

What bounds it: batching members saves per-operation overhead (Python, dispatch, small
kernels), not arithmetic. On 2 CPU cores one quickstart member already runs its matrix products
at about a quarter of the cores' peak (~0.9 GFLOP per step in ~18 ms), so there is little
overhead to save. What does cost is the cache: one pass over all 16 members' attention scores
(2 MiB each) spills it (0.81-0.96x), so the training step takes the members in passes
(``model.members_per_pass``; one at a time here, four with batch 8): 1.08x for 16, 1.57x with
batch 8 (--batch-size 8). The gain is large where one small model leaves the hardware idle: on a
GPU, or with many small models.

    python bench/ensemble_scaling.py [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402
from tracking_overhead import make  # noqa: E402

from devinterp.data import MemberStreams  # noqa: E402


class Trainee:
    """One model (an ensemble of ``members``) with its optimiser and data stream."""

    def __init__(self, members: int, seed: int, batch_size: int | None = None):
        data, self.module = make(members)
        data.batch_size = batch_size or data.batch_size
        self.language = data.language
        seeds = [seed + k for k in range(members)]
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=self.module.hparams.lr, fused=True)
        self.stream = iter(
            MemberStreams(data.language, data.seq_len, data.batch_size, seeds, data.steps_per_block)
        )

    def step(self) -> None:
        batch = next(self.stream)
        self.optimizer.zero_grad(set_to_none=True)
        member_loss, _ = self.module.member_losses(batch["tokens"], batch["labels"])
        member_loss.sum().backward()
        self.optimizer.step()


def seconds_per_step(trainees: list[Trainee], steps: int, warmup: int = 3) -> float:
    """Wall time of one step of every trainee (one after another), after a warm-up."""
    for _ in range(warmup):
        for trainee in trainees:
            trainee.step()
    start = time.perf_counter()
    for _ in range(steps):
        for trainee in trainees:
            trainee.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per member (quickstart: 32)")
    args = parser.parse_args()
    together = {M: [Trainee(M, seed=0, batch_size=args.batch_size)] for M in args.members}
    apart = {M: [Trainee(1, seed=k, batch_size=args.batch_size) for k in range(M)] for M in args.members}
    times = {(M, how): [] for M in args.members for how in ("together", "apart")}
    for _ in range(args.repeats):
        for M in args.members:
            times[(M, "together")].append(seconds_per_step(together[M], args.steps))
            times[(M, "apart")].append(seconds_per_step(apart[M], args.steps))
    print(
        f"quickstart size, batch {args.batch_size or 32}, {args.steps} timed steps, "
        f"median of {args.repeats}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'members':>8}{'one process ms':>16}{'one by one ms':>15}{'ratio':>8}")
    for M in args.members:
        one, apart_ = statistics.median(times[(M, "together")]), statistics.median(times[(M, "apart")])
        print(f"{M:>8}{one * 1000:>16.1f}{apart_ * 1000:>15.1f}{apart_ / one:>8.2f}")
        if M > 1:
            report(
                f"ensemble: {M} members in one process / one by one, throughput",
                apart_ / one,
                ">= 1.0 (CPU)" if M == 16 else "",
            )


if __name__ == "__main__":
    main()
