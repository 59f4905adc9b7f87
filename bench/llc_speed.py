"""Our LLC estimator against timaeus devinterp 2.0.1: the same estimate, and how long each takes.

The same checkpoint (a quickstart-size ensemble trained here for ``--train-steps`` steps), the
same data (our LLC data pool of the seed language), the same loss (mean next-token
cross-entropy over every predicted position) and the same hyperparameters (SGLD, eps, n_beta,
gamma, chains, draws, batch size, no burn-in). Ours samples every member's chains at once in one
batched model (devinterp.llc.snapshots), in passes of copies sized to the CPU's cache, with L(w*) read
from the pool's per-position losses at w* computed once; the library samples one chain of one
member at a time, so its members run one after another (bench/llc_reference_side.py, in its own
virtual environment and process: it imports as ``devinterp``, as ours does). Both get the same
number of torch threads.

Printed: per member both estimates with their standard errors over chains and whether they
agree within two combined standard errors (they are different Monte Carlo estimates of one
expectation: the library evaluates L(w*) on 32 batches of its own, ours on the draws' batches),
and the wall time of each for ``--members`` x ``--chains`` x ``--draws``. Targets: agreement;
ours >= 2x faster on CPU (>= 20x on a GPU).

    make bench-llc-env                  # once: .venv-devinterp with devinterp==2.0.1
    python bench/llc_speed.py [--members 16] [--chains 8] [--draws 200]

Without ``.venv-devinterp`` it times ours alone and says how to make the environment.
"""

from __future__ import annotations

import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, report  # noqa: E402
from ensemble_scaling import Trainee  # noqa: E402

from devinterp.llc.sampler import SamplerConfig, estimate_llc  # noqa: E402
from devinterp.llc.snapshots import POOL_SEED, DataPool, Refinement, copies_per_pass, make_loss  # noqa: E402
from devinterp.model import ModelConfig, TensorTransformer  # noqa: E402

REFERENCE_PYTHON = ROOT / ".venv-devinterp" / "bin" / "python"


def trained_checkpoint(members: int, train_steps: int, pool_size: int):
    """A quickstart-size ensemble trained ``train_steps`` steps here: (its module, its weights
    (member, ...), an LLC data pool of ``pool_size`` sequences of its language)."""
    trainee = Trainee(members, seed=0)
    for _ in range(train_steps):
        trainee.step()
    module = trainee.module
    weights = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    sample = trainee.language.sample(pool_size, module.cfg.n_ctx, POOL_SEED)
    return module, weights, DataPool(torch.from_numpy(sample.tokens), torch.from_numpy(sample.labels))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per chain and step")
    parser.add_argument("--pool-size", type=int, default=1024)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--gamma", type=float, default=100.0)
    parser.add_argument(
        "--n-beta",
        type=float,
        default=14.58,
        help="default: what `devinterp llc --calibrate` chose at the quickstart's size with eps 1e-3 "
        "(b / log b over a batch, 145.8, diverges there at eps 1e-3)",
    )
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--reference-python", default=str(REFERENCE_PYTHON))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    module, weights, pool = trained_checkpoint(args.members, args.train_steps, args.pool_size)
    seq_len = module.cfg.n_ctx
    n_beta = args.n_beta
    sampler = SamplerConfig(
        n_beta=n_beta, eps=args.eps, gamma=args.gamma, chains=args.chains, draws=args.draws
    )
    fields = {f: getattr(module.cfg, f) for f in ModelConfig.__dataclass_fields__}
    copies = TensorTransformer(ModelConfig(**{**fields, "n_members": args.members * args.chains}))
    loss = make_loss(copies, pool, Refinement("model"), args.batch_size)
    per_pass = copies_per_pass(module.cfg, args.batch_size, seq_len)
    print(
        f"{args.members} members x {args.chains} chains x {args.draws} draws, batch {args.batch_size} x "
        f"{seq_len} tokens, eps {args.eps:g}, gamma {args.gamma:g}, n_beta {n_beta:.4g}, "
        f"{args.threads} threads, checkpoint after {args.train_steps} training steps; ours in passes of "
        f"at most {per_pass} copies",
        flush=True,
    )
    started = time.perf_counter()
    ours = estimate_llc(
        loss,
        weights,
        sampler,
        anchor_loss=loss.at_anchor(weights, per_pass * args.batch_size),
        copies_per_pass=per_pass,
    )
    ours_seconds = time.perf_counter() - started
    print(f"ours (batched): {ours_seconds:.1f} s", flush=True)

    reference = Path(args.reference_python)
    if not reference.exists():
        print(f"no {reference}: `make bench-llc-env` makes it; timing ours alone")
        report("llc ours: seconds for members x chains x draws", ours_seconds, unit=" s")
        return 0
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.npz", Path(folder) / "out.json"
        settings = {
            "model": {k: v for k, v in fields.items() if k != "n_members"},
            "members": args.members,
            "eps": args.eps,
            "gamma": args.gamma,
            "n_beta": n_beta,
            "chains": args.chains,
            "draws": args.draws,
            "batch_size": args.batch_size,
            "seed": 0,
            "threads": args.threads,
        }
        np.savez(
            source,
            settings=json.dumps(settings),
            pool=pool.tokens.numpy(),
            **{f"weight_{name}": value.numpy() for name, value in weights.items()},
        )
        subprocess.run(
            [str(reference), str(ROOT / "bench" / "llc_reference_side.py"), str(source), str(target)],
            check=True,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        theirs = json.loads(target.read_text())
    agree = 0
    print("member   ours [SE]            devinterp 2.0.1 [SE]   |z|")
    for k, found in enumerate(theirs["members"]):
        combined = float(np.hypot(ours.std_error[k], found["std_error"]))
        z = abs(ours.llc[k] - found["llc"]) / combined
        agree += z <= 2
        print(
            f"{k:>6}   {ours.llc[k]:7.2f} [{ours.std_error[k]:5.2f}]   "
            f"{found['llc']:7.2f} [{found['std_error']:5.2f}]        {z:4.2f}"
        )
    ratio = theirs["seconds"] / ours_seconds
    print(f"devinterp 2.0.1 (one member after another): {theirs['seconds']:.1f} s; ours {ours_seconds:.1f} s")
    report("llc: members where ours and devinterp 2.0.1 agree (2 SE)", agree / args.members, "1 (of members)")
    report("llc: devinterp 2.0.1 time / ours (batched)", ratio, ">= 2 CPU, >= 20 GPU", "x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
