"""Long sequences: the chunked linear attention path against the quadratic one.

The quickstart's model (1 member, 2 layers, 4 bilinear heads, d_model 64, d_head 16, RoPE), one
training step (forward, backward) at T = 128, 512, 2048 with batch 8192 / T (a fixed number of
tokens, so the quadratic path's T x T tensors fit in memory), timed for both paths; the median
of repeats. Prints each path's time per step, the quadratic / linear ratio (> 1: linear is
faster) and the path ``auto`` picks, which should be the faster one.

    python bench/attention_paths.py [--lengths 128 512 2048] [--repeats 3]
"""

from __future__ import annotations

import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, seconds_per_call  # noqa: E402

from devinterp.model import ModelConfig, TensorTransformer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--tokens", type=int, default=8192, help="batch x length per step")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"quickstart heads (d_head 16, bilinear), {args.tokens} tokens per step, median of {args.repeats}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'T':>6}{'batch':>7}{'quadratic ms':>14}{'linear ms':>11}{'ratio':>8}  auto")
    for T in args.lengths:
        cfg = ModelConfig(d_vocab=33, n_ctx=T, n_members=1, n_layers=2, n_heads=4, d_model=64, d_head=16)
        model = TensorTransformer(cfg, seed=0)
        with torch.no_grad():
            model.W_O.normal_(0, 0.02)
            model.W_U.normal_(0, 0.02)
        batch = max(1, args.tokens // T)
        tokens = torch.randint(0, 33, (1, batch, T), generator=torch.Generator().manual_seed(0))
        times = {}
        for path in ("quadratic", "linear"):
            model.cfg = dataclasses.replace(cfg, attention_path=path)

            def step():
                model.zero_grad(set_to_none=True)
                model(tokens).float().logsumexp(-1).mean().backward()

            times[path] = seconds_per_call(step, args.repeats, warmup=1)
        ratio = times["quadratic"] / times["linear"]
        auto = "linear" if cfg.uses_linear_path(T) else "quadratic"
        faster = "linear" if ratio > 1 else "quadratic"
        print(
            f"{T:>6}{batch:>7}{times['quadratic'] * 1000:>14.1f}{times['linear'] * 1000:>11.1f}"
            f"{ratio:>8.2f}  "
            f"{auto}{'' if auto == faster else ' (not the faster here)'}"
        )
        report(f"attention T={T}: quadratic / linear step time", ratio, f"auto: {auto}")


if __name__ == "__main__":
    main()
