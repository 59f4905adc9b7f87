"""The LLC sampler against its floor: what one SGLD step cannot avoid doing.

One SGLD step of every copy (members x chains) must at least run a forward and backward of the
batched copies on their batches, draw the Gaussian noise of every parameter, and apply the
update w <- w - (eps/2) (n_beta grad + gamma (w - w*)) + sqrt(eps) noise. Each of the three is
timed alone, on the same checkpoint, copies, passes and batches as bench/llc_speed.py, then our
sampler's step (devinterp.llc.sampler.estimate_llc: the same plus its bookkeeping: draw losses, the
divergence guard, the step's anchor losses). Prints each part in ms per step and our step as a
ratio to their sum (target <= 1.15); where it is above, the difference is the sampler's own work.

    python bench/llc_floor.py [--members 16] [--chains 8] [--steps 40] [--repeats 5]
"""

from __future__ import annotations

import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devinterp.threads import available_cores, use_threads  # noqa: E402

from common import report  # noqa: E402
from llc_speed import trained_checkpoint  # noqa: E402

from devinterp.llc.sampler import SamplerConfig, _loss_and_grads, _repeat, estimate_llc  # noqa: E402
from devinterp.llc.snapshots import Refinement, copies_per_pass, make_loss  # noqa: E402
from devinterp.model import TensorTransformer  # noqa: E402


def per_step(fn, steps: int) -> float:
    """Seconds per call of fn(step) over ``steps`` calls, after one warm-up call."""
    fn(0)
    start = time.perf_counter()
    for step in range(steps):
        fn(step)
    return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="SGLD steps per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=300)
    args = parser.parse_args()
    use_threads(available_cores())  # as `devinterp llc` does

    module, weights, pool = trained_checkpoint(args.members, args.train_steps, 1024)
    copies = TensorTransformer(replace(module.cfg, n_members=args.members * args.chains))
    loss = make_loss(copies, pool, Refinement("model"), args.batch_size)
    per_pass = copies_per_pass(module.cfg, args.batch_size, module.cfg.n_ctx)
    config = SamplerConfig(n_beta=14.58, eps=1e-3, gamma=100.0, chains=args.chains, draws=args.steps)
    anchor = {name: value.detach() for name, value in _repeat(weights, args.chains).items()}
    moving = {name: value.clone() for name, value in anchor.items()}
    grads = _loss_and_grads(loss, moving, 0, per_pass)[1]
    noises = [torch.empty_like(value) for value in moving.values()]
    generator = torch.Generator().manual_seed(0)
    at_anchor = loss.at_anchor(weights, per_pass * args.batch_size)

    def forward_backward(step: int) -> None:
        _loss_and_grads(loss, moving, step, per_pass)

    def noise(step: int) -> None:
        for value in noises:
            value.normal_(generator=generator)

    root_eps = math.sqrt(config.eps)

    @torch.no_grad()
    def update(step: int) -> None:
        for (name, weight), grad, value in zip(moving.items(), grads, noises):
            drift = config.n_beta * grad + config.gamma * (weight - anchor[name])
            weight.add_(-0.5 * config.eps * drift + root_eps * value)

    def sampler(step: int) -> None:  # ``steps`` whole SGLD steps per call, a draw each step
        estimate_llc(loss, weights, config, anchor_loss=at_anchor, copies_per_pass=per_pass)

    parts = {"forward and backward": forward_backward, "noise": noise, "update": update}
    times: dict[str, list[float]] = {name: [] for name in [*parts, "ours"]}
    for _ in range(args.repeats):  # interleaved: the machine's drift hits every part alike
        for name, fn in parts.items():
            for value, start in zip(moving.values(), anchor.values()):
                value.copy_(start)
            times[name].append(per_step(fn, args.steps))
        started = time.perf_counter()
        sampler(0)
        times["ours"].append((time.perf_counter() - started) / args.steps)
    median = {name: statistics.median(values) for name, values in times.items()}
    floor = sum(median[name] for name in parts)
    print(
        f"{args.members} members x {args.chains} chains, batch {args.batch_size} x {module.cfg.n_ctx}, "
        f"passes of at most {per_pass} copies, {torch.get_num_threads()} threads; median of {args.repeats}"
    )
    for name in parts:
        print(f"  {name:<22}{median[name] * 1e3:9.2f} ms per step")
    print(f"  {'floor (their sum)':<22}{floor * 1e3:9.2f} ms per step")
    print(f"  {'ours (estimate_llc)':<22}{median['ours'] * 1e3:9.2f} ms per step")
    print(f"ours / floor: {median['ours'] / floor:.3f} (target <= 1.15)")
    report("llc: our SGLD step / floor (forward+backward, noise, update)", median["ours"] / floor, "<= 1.15")
    return 0


if __name__ == "__main__":
    sys.exit(main())
