"""Our training against a plain PyTorch loop at the reference scale (configs/reference.yaml).

The plain loop is the reference trainer's way of working: sample a batch of the seed language,
forward, per-rule losses (the mean loss at the positions each rule produced, read on the host
each step as a reference trainer logs them), backward, AdamW. Ours is `devinterp fit`'s path:
Lightning with all tracking on (weight metrics every step, diagnostics every 10 steps, probes at
the config's cadence, the HDF5 timeline, W&B offline). Both train the same model on the same
sizes (2 layers, 4 heads, d_model 64, batch 256 x 128 tokens). Interleaved repeats, median.
Prints our steps/s over the plain loop's (target at least 0.9).

    python bench/reference_loop.py [--steps 8] [--warmup 2] [--repeats 3]
"""

from __future__ import annotations

import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_run_config, report  # noqa: E402
from tracking_overhead import make, tracked_seconds_per_step  # noqa: E402

from devinterp.cadence import due_steps  # noqa: E402
from devinterp.probe import grouped_mean  # noqa: E402


def plain_seconds_per_step(steps: int, warmup: int) -> float:
    data, module = make(1, "reference")
    model, language = module.model, data.language
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=module.hparams.lr, fused=True
    )  # as ours: compare tracking
    n_rules = len(language.rule_names)
    start = 0.0
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        sample = language.sample(data.batch_size, data.seq_len, seed=[7, step])
        tokens = torch.from_numpy(sample.tokens)[None]  # (1, batch, pos)
        rules = torch.from_numpy(sample.rules)[None, :, 1:].reshape(1, -1)
        logits = model(tokens[..., :-1])
        nll = F.cross_entropy(logits.flatten(0, 2), tokens[..., 1:].flatten(), reduction="none")[None]
        per_rule = grouped_mean(nll.detach(), rules, n_rules).tolist()  # logged every step
        optimizer.zero_grad(set_to_none=True)
        nll.mean().backward()
        optimizer.step()
        del per_rule
    return (time.perf_counter() - start) / (steps - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    config = load_run_config("reference")
    # the mean spacing of the config's log-spaced probe schedule over the whole run (a few timed
    # steps near step 0 would otherwise all be probe steps)
    max_steps = config["trainer"]["max_steps"]
    probe_every = round(max_steps / len(due_steps(max_steps, "log", 1, config["probe"]["per_doubling"])))
    plain, ours = [], []
    for _ in range(args.repeats):
        plain.append(plain_seconds_per_step(args.steps, args.warmup))
        ours.append(
            tracked_seconds_per_step(
                1, args.steps, args.warmup, probes=True, config="reference", probe_every=probe_every
            )
        )
    plain_s, ours_s = statistics.median(plain), statistics.median(ours)
    print(
        f"reference scale (configs/reference.yaml), {args.steps - args.warmup} timed steps, median of "
        f"{args.repeats}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'plain loop, per-rule losses':<34}{1 / plain_s:>8.3f} steps/s")
    print(f"{'devinterp, all tracking on':<34}{1 / ours_s:>8.3f} steps/s")
    print(f"{'ratio (target >= 0.9)':<34}{plain_s / ours_s:>8.3f}")
    report("reference scale: ours / plain loop, steps per s", plain_s / ours_s, ">= 0.9")


if __name__ == "__main__":
    main()
