"""Cost of a mechanism intervention per training step, against the same tracked run without one.

The quickstart's model and data, tracked as in bench/tracking_overhead.py (weight metrics every
step, diagnostics every 10, the HDF5 timeline, W&B offline, no probes), with:
  none       no intervention
  penalty    mechanism/L0H*/prev_token_output on every member (its value and gradient every step)
  clamp      every layer-0 head held at zero (gradients zeroed, slices written back every step)
Interleaved and repeated; each figure is the median over repeats. No target: the figures say
what an intervention costs.

    python bench/intervention_overhead.py [--steps 90] [--members 8] [--repeats 3]
"""

from __future__ import annotations

import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402
from tracking_overhead import tracked_seconds_per_step  # noqa: E402

from callbacks.mechanism_interventions import MechanismInterventions  # noqa: E402

VARIANTS = {
    "none": [],
    "penalty": [{"kind": "penalty", "metric": "mechanism/L0H*/prev_token_output", "weight": 10.0}],
    "clamp": [{"kind": "clamp", "component": "L0H*", "hold": "zero"}],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, interventions in VARIANTS.items():
            extra = [MechanismInterventions(interventions)] if interventions else []
            times[name].append(
                tracked_seconds_per_step(
                    args.members, args.steps, args.warmup, probes=False, first_callbacks=extra
                )
            )
    median = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"quickstart size, {args.members} members, {args.steps - args.warmup} timed steps, "
        f"median of {args.repeats}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'intervention':<12}{'ms/step':>10}{'ratio':>8}")
    for name in VARIANTS:
        print(f"{name:<12}{median[name] * 1000:>10.1f}{median[name] / median['none']:>8.3f}")
    report("interventions: penalty / none step time", median["penalty"] / median["none"])
    report("interventions: clamp / none step time", median["clamp"] / median["none"])


if __name__ == "__main__":
    main()
