"""How far the LLC estimate moves under a rescaling that leaves the model's function unchanged.

Bilinear attention's score is (q1 . k1)(q2 . k2), so W_Q,1 -> a W_Q,1 with W_K,1 -> W_K,1 / a (every
head, every layer) is the same function. The learning coefficient is a property of the function's
loss landscape up to such reparametrisations, but its SGLD estimate is not: the step size, the
noise and the localisation term gamma |w - w*|^2 / 2 are all isotropic in the weights, and the
rescaling makes the landscape steeper along W_K,1 and flatter along W_Q,1 (for a > 1). This prints,
at each a, the largest change of the logits (the function must not move), the member-median
estimate and its change from a = 1, on a quickstart-size ensemble trained here, with every scale
and member sampled at once as one batched estimate.

    python bench/llc_invariance.py [--scales 0.25 0.5 1 2 4] [--draws 80]
"""

from __future__ import annotations

import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402
from llc_speed import trained_checkpoint  # noqa: E402

from devinterp.llc.sampler import SamplerConfig, estimate_llc  # noqa: E402
from devinterp.llc.snapshots import Refinement, make_loss  # noqa: E402
from devinterp.model import TensorTransformer  # noqa: E402


def rescaled(weights: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """W_Q of Q/K pair 1 times ``scale`` and W_K of pair 1 divided by it, in every head and layer."""
    out = {name: value.clone() for name, value in weights.items()}
    out["W_Q"][:, :, 0] *= scale  # (member, layer, pair, head, d_model, d_head)
    out["W_K"][:, :, 0] /= scale
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=80)
    parser.add_argument("--burn-in", type=int, default=20)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--gamma", type=float, default=100.0)
    parser.add_argument("--n-beta", type=float, default=14.58)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if 1.0 not in args.scales:
        args.scales.append(1.0)

    module, weights, pool = trained_checkpoint(args.members, args.train_steps, pool_size=256)

    with torch.no_grad():
        reference = module.model(pool.tokens[None, :32].expand(args.members, -1, -1))
        drift = {}
        for scale in args.scales:
            copy = TensorTransformer(module.cfg)
            for name, value in rescaled(weights, scale).items():
                getattr(copy, name).copy_(value)
            drift[scale] = float(
                (copy(pool.tokens[None, :32].expand(args.members, -1, -1)) - reference).abs().max()
            )

    groups = {name: torch.cat([rescaled(weights, s)[name] for s in args.scales]) for name in weights}
    n_copies = len(args.scales) * args.members * args.chains
    copies = TensorTransformer(replace(module.cfg, n_members=n_copies))
    sampler = SamplerConfig(
        n_beta=args.n_beta,
        eps=args.eps,
        gamma=args.gamma,
        chains=args.chains,
        draws=args.draws,
        burn_in=args.burn_in,
    )
    print(
        f"{args.members} members trained {args.train_steps} steps; SGLD n_beta {args.n_beta:g}, eps "
        f"{args.eps:g}, gamma {args.gamma:g}, {args.chains} chains x {args.draws} draws (+{args.burn_in} "
        "burn-in)",
        flush=True,
    )
    loss = make_loss(copies, pool, Refinement("model"), args.batch_size)
    found = estimate_llc(loss, groups, sampler, anchor_loss=loss.at_anchor(groups))
    llc = found.llc.reshape(len(args.scales), args.members)
    error = found.std_error.reshape(len(args.scales), args.members)
    base = llc[args.scales.index(1.0)]
    print("scale a   max |logit change|   median LLC [members' SE]   median change from a = 1")
    worst = 0.0
    for k, scale in enumerate(args.scales):
        change = np.median((llc[k] - base) / base)
        worst = max(worst, abs(change)) if scale in (0.5, 2.0) else worst
        print(
            f"{scale:7g}   {drift[scale]:18.2e}   {np.median(llc[k]):10.2f} [{np.median(error[k]):.2f}]"
            f"        {change:+.1%}"
        )
    report("llc: largest median change under a Q/K rescaling by 2 (or 1/2)", worst, "small; not invariant")
    return 0


if __name__ == "__main__":
    sys.exit(main())
