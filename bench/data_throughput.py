"""Data throughput with DataLoader workers at the reference scale, and the share of a training
step spent waiting for data.

At the reference scale (configs/reference.yaml: batch 256 x 128 tokens, blocks of 4 steps) for 1
and 16 member streams:
  sampled tokens/s  the stream through 0, 1 and 2 DataLoader workers (data.num_workers), timed
                    over steps after the workers are warm; workers compute with one thread each;
                    and the device sampler (data.sampler device) in torch on the CPU, and on
                    CUDA where there is one
  training          tokens/s one training step of the reference model consumes (1 member;
                    forward, backward, AdamW), with torch's default threads and with run.threads
                    auto, and the share of each step's wall time spent waiting in next(batch),
                    measured in a loop that trains on what the loader gives
Prints the 2-worker speed-up over 0 workers (aim >= 1.7x on 2 otherwise idle cores; the machine
is shared, so a figure, not an assertion).

    python bench/data_throughput.py [--steps 96] [--train-steps 6]
"""

from __future__ import annotations

from devinterp.threads import available_cores  # OpenMP's wait policy, set before torch loads

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, load_run_config, report  # noqa: E402

from devinterp.data import MemberStreams, stream_loader  # noqa: E402
from devinterp.language import load_language  # noqa: E402
from devinterp.module import TensorTransformerModule  # noqa: E402


def loader(language, members: int, workers: int, data_cfg: dict, device: str | None = None):
    streams = MemberStreams(
        language,
        data_cfg["seq_len"],
        data_cfg["batch_size"],
        list(range(members)),
        data_cfg["steps_per_block"],
        device=None if device is None else torch.device(device),
    )
    return iter(stream_loader(streams, workers))


def sampled_tokens_per_s(
    language, members: int, workers: int, steps: int, data_cfg: dict, device: str | None = None
) -> float:
    batches = loader(language, members, workers, data_cfg, device)
    for _ in range(2 * data_cfg["steps_per_block"] * max(1, workers)):  # workers started and warm
        next(batches)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return batch["tokens"].numel() * steps / elapsed


def training(language, workers: int, steps: int, cfg: dict) -> tuple[float, float]:
    """(tokens/s consumed, share of wall time waiting for data) over ``steps`` steps of 1 member."""
    model_cfg, data_cfg = cfg["model"], cfg["data"]
    module = TensorTransformerModule(
        d_vocab=language.d_vocab,
        n_ctx=data_cfg["seq_len"],
        label_names=language.label_names,
        **{k: v for k, v in model_cfg.items() if k not in ("schedule", "n_members")},
        n_members=1,
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)
    batches = loader(language, 1, workers, data_cfg)
    for _ in range(2 * data_cfg["steps_per_block"] * max(1, workers)):
        next(batches)
    waiting, start = 0.0, time.perf_counter()
    for _ in range(steps):
        before = time.perf_counter()
        batch = next(batches)
        waiting += time.perf_counter() - before
        optimizer.zero_grad(set_to_none=True)
        member_loss, _ = module.member_losses(batch["tokens"], batch["labels"])
        member_loss.sum().backward()
        optimizer.step()
    elapsed = time.perf_counter() - start
    return batch["tokens"].numel() * steps / elapsed, waiting / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=96, help="steps timed per 1-stream figure (16 streams: / 6)"
    )
    parser.add_argument("--train-steps", type=int, default=6, help="training steps timed per figure")
    args = parser.parse_args()
    cfg = load_run_config("reference")
    data_cfg = cfg["data"]
    language = load_language(ROOT / data_cfg["language"])
    default_threads = torch.get_num_threads()
    print(
        f"reference scale: {data_cfg['batch_size']} x {data_cfg['seq_len']} tokens per member stream, "
        f"blocks of {data_cfg['steps_per_block']} steps; {available_cores()} cores available, torch "
        "default threads "
        f"{default_threads}"
    )
    print(f"{'member streams':<16}{'sampler':>16}{'sampled tokens/s':>18}{'vs 0 workers':>14}")
    speedups = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for members in (1, 16):
        rates = {}
        steps = args.steps if members == 1 else max(8, args.steps // 6)
        for workers in (0, 1, 2):
            rates[workers] = sampled_tokens_per_s(language, members, workers, steps, data_cfg)
            name = f"numpy, {workers} worker{'s' * (workers != 1)}"
            print(f"{members:<16}{name:>16}{rates[workers]:>18,.0f}{rates[workers] / rates[0]:>14.2f}")
        speedups[members] = rates[2] / rates[0]
        for device in devices:  # the device sampler: torch, in this process, on that device
            rate = sampled_tokens_per_s(language, members, 0, steps, data_cfg, device)
            print(f"{members:<16}{'device, ' + device:>16}{rate:>18,.0f}{rate / rates[0]:>14.2f}")
    print(f"\n{'training (1 member)':<26}{'threads':>8}{'workers':>8}{'tokens/s':>12}{'waiting':>10}")
    for threads in (default_threads, available_cores()):
        torch.set_num_threads(threads)
        for workers in (0, 2):
            rate, wait = training(language, workers, args.train_steps, cfg)
            print(f"{'':<26}{threads:>8}{workers:>8}{rate:>12,.0f}{wait:>10.1%}")
    torch.set_num_threads(default_threads)
    report("data: 2 workers / 0 workers, 1 stream", speedups[1], ">= 1.7 (2 idle cores)")
    report("data: 2 workers / 0 workers, 16 streams", speedups[16], ">= 1.7 (2 idle cores)")


if __name__ == "__main__":
    main()
