"""DGP throughput against the rate training consumes tokens, at the quickstart's size.

Prints sampled tokens/s (the data stream exactly as training draws it: per-member blocks), the
tokens/s one training step of the quickstart model consumes (forward, backward, AdamW; no
tracking), and their ratio. Target: at least 10x, so data never slows training.

    python bench/dgp_throughput.py [--config quickstart]
"""

from __future__ import annotations

import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, load_run_config, report, seconds_per_call  # noqa: E402

from devinterp.data import MemberStreams  # noqa: E402
from devinterp.language import load_language  # noqa: E402
from devinterp.module import TensorTransformerModule  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--language", default=None, help="language spec (default: the config's)")
    args = parser.parse_args()
    cfg = load_run_config(args.config)
    model_cfg, data_cfg = cfg["model"], cfg["data"]
    language = load_language(ROOT / (args.language or data_cfg["language"]))
    M, B, T = model_cfg["n_members"], data_cfg["batch_size"], data_cfg["seq_len"]
    steps_per_block = data_cfg.get("steps_per_block", 16)
    tokens_per_step = M * B * T

    streams = MemberStreams(language, T, B, [k for k in range(M)], steps_per_block)
    block_index = iter(range(10**9))
    dgp_seconds = seconds_per_call(lambda: streams.block(next(block_index)), repeats=5, warmup=1)
    dgp_tokens_per_s = tokens_per_step * steps_per_block / dgp_seconds

    module = TensorTransformerModule(
        d_vocab=language.d_vocab,
        n_ctx=T,
        label_names=language.label_names,
        **{k: v for k, v in model_cfg.items() if k != "schedule"},
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    tokens, labels = (torch.from_numpy(a[:, :B]) for a in streams.block(10**6))

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        member_loss, _ = module.member_losses(tokens, labels)
        member_loss.sum().backward()
        optimizer.step()

    train_seconds = seconds_per_call(train_step, repeats=20, warmup=3)
    train_tokens_per_s = tokens_per_step / train_seconds
    print(
        f"config {args.config}: {M} members x {B} sequences x {T} tokens, language {language.name!r}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'DGP sampled tokens/s':<34}{dgp_tokens_per_s:>14,.0f}")
    print(f"{'training consumes tokens/s':<34}{train_tokens_per_s:>14,.0f}")
    print(f"{'ratio (target >= 10)':<34}{dgp_tokens_per_s / train_tokens_per_s:>14.1f}")
    report(
        f"DGP / training tokens per s ({args.config}, {language.name})",
        dgp_tokens_per_s / train_tokens_per_s,
        ">= 10",
    )


if __name__ == "__main__":
    main()
