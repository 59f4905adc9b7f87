"""The prepared device check (``make gpu-check``): one command, one table, at most about 5
minutes on one GPU.

At the reference scale (configs/reference.yaml: 2 layers, d_model 64, batch 256 x 128 tokens),
through Lightning with full tracking (weight metrics every step, diagnostics and probes on their
log schedules, the HDF5 timeline, snapshots; no W&B: the device machine has none), timed over
``--steps`` steps after a warm-up:
  tracked, 1 and 16 members   steps/s, tokens/s, peak GPU memory
  bare loop, 1 and 16         the same steps as a plain PyTorch loop (sample, forward, backward,
                              AdamW): tracked / bare step time (target <= 1.10)
  data wait                   share of the bare loop's wall time spent in next(batch), with the
                              DataLoader workers data.num_workers auto gives (target <= 5%);
                              with the device sampler (data.sampler device; 16 members, blocks
                              of 4 steps, the config's, and of 64), whose work shares the
                              device with training: 1 - (step time on one fixed batch) / (step
                              time sampling)
  device sampler              ms per block of 4 steps for 16 members, eager and captured as one
                              CUDA graph (the graph's block must equal the eager one)
  syncs                       CUDA synchronisations per non-flush tracked step
                              (torch.cuda.set_sync_debug_mode; target 0)
  ensemble                    16 members in one process against 16 x one member's step time
                              (target >= 8x)
  compile                     the 1-member tracked step with model.compile on
  reference run               5000 steps of 1 member, tracked, extrapolated (target < 2 minutes)
  llc                         SGLD steps of 16 members x 8 chains in one pass (devinterp.llc.sampler, at the
                              quickstart's size, batch 16) against one chain of one member at a time,
                              the schedule of timaeus devinterp 2.0.1, which is not on the device
                              machine (our estimator stands in for it): per chain-step (target >= 20x)
Without CUDA it says so and exits 0 (rehearse the command on a CPU machine that way);
``--rehearse`` runs every measurement on the CPU for a few steps with 1 and 2 members, to check
the script itself before device time is spent on it. Needs torch, lightning, h5py, numpy, scipy,
pyyaml; not wandb or jsonargparse.

    python3 bench/gpu_check.py [--steps 200] [--warmup 30] [--rehearse]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per figure")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rehearse", action="store_true", help="run everything on the CPU, briefly")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

    try:
        import torch
    except ImportError:
        print("gpu_check: needs torch and CUDA (torch is not installed for this python); nothing measured")
        return 0
    if not torch.cuda.is_available() and not args.rehearse:
        print("gpu_check: needs CUDA (no CUDA device here); nothing measured")
        return 0
    global DEVICE, ENSEMBLE
    if args.rehearse:
        DEVICE, ENSEMBLE = "cpu", 2
        args.steps, args.warmup = 3, 2
    rows = measure(args.steps, args.warmup)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (rehearsal: the figures mean nothing)"
    print(f"device: {name}, torch {torch.__version__}")
    print(f"{'figure':<46}{'value':>16}  target")
    for name, value, target in rows:
        print(f"{name:<46}{value:>16}  {target}")
    return 0


DEVICE, ENSEMBLE = "cuda", 16  # the rehearsal: "cpu", 2


def synchronize() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make(members: int, compile: bool = False):
    """The reference config's data and model (bench/tracking_overhead.py builds them)."""
    from tracking_overhead import make as make_run

    return make_run(members, "reference", compile)


def tracked(members: int, steps: int, warmup: int, compile: bool = False, flush: int = 100):
    """(seconds per step, peak GPU bytes, syncs per non-flush step) of a tracked run."""
    import tempfile

    import lightning as L
    import torch
    from gpu_sync_check import SyncCounter

    from callbacks import CircuitMetrics, ProbeMetrics, TimelineWriter

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup:
                synchronize()
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            synchronize()
            self.end = time.perf_counter()

    data, module = make(members, compile)
    clock = Clock()
    counters = [SyncCounter(flush)] if DEVICE == "cuda" else []
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_steps=warmup + steps,
            default_root_dir=root,
            logger=False,
            accelerator=DEVICE,
            devices=1,
            callbacks=[
                clock,
                *counters,
                CircuitMetrics(),
                ProbeMetrics(),
                TimelineWriter(flush_every_n_steps=flush),
            ],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(module, datamodule=data)
    quiet = [len(c) for s, c in counters[0].counts.items() if s > warmup] if counters else [0]
    peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0
    return (clock.end - clock.start) / steps, peak, sum(quiet) / max(1, len(quiet))


def bare(members: int, steps: int, warmup: int, sampler: str = "numpy", steps_per_block: int | None = None):
    """(seconds per step, share of wall time waiting for data) of a plain loop on the GPU, fed by
    the DataLoader workers the run would use (data.num_workers auto), or by the device sampler
    (``sampler="device"``, in this process) in blocks of ``steps_per_block`` (the config's)."""
    import torch

    from devinterp.data import MemberStreams, gpu_workers, stream_loader

    data, module = make(members)
    module = module.to(DEVICE)
    optimizer = torch.optim.AdamW(module.parameters(), lr=module.hparams.lr, fused=True)
    streams = MemberStreams(
        data.language,
        data.seq_len,
        data.batch_size,
        data.stream_seeds,
        steps_per_block or data.steps_per_block,
        device=torch.device(DEVICE) if sampler == "device" else None,
    )
    workers = gpu_workers() if sampler == "numpy" else 0
    batches = iter(stream_loader(streams, workers, pin_memory=DEVICE == "cuda" and sampler == "numpy"))
    if sampler == "fixed":  # one batch over and over: the step without any data cost
        batches = itertools.repeat(next(batches))
    waiting = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            synchronize()
            start, waiting = time.perf_counter(), 0.0
        before = time.perf_counter()
        batch = next(batches)
        waiting += time.perf_counter() - before
        tokens = batch["tokens"].to(DEVICE, non_blocking=True)
        labels = batch["labels"].to(DEVICE, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        member_loss, _ = module.member_losses(tokens, labels)
        member_loss.sum().backward()
        optimizer.step()
    synchronize()
    elapsed = time.perf_counter() - start
    return elapsed / steps, waiting / elapsed


def measure(steps: int, warmup: int) -> list[tuple[str, str, str]]:
    from common import load_run_config

    cfg = load_run_config("reference")
    tokens_per_member = cfg["data"]["batch_size"] * cfg["data"]["seq_len"]
    rows = []
    results = {}
    for members in (1, ENSEMBLE):
        step, peak, syncs = tracked(members, steps, warmup)
        bare_step, wait = bare(members, steps, warmup)
        results[members] = step
        rows += [
            (f"tracked, {members} member(s): steps/s", f"{1 / step:.1f}", ""),
            (f"tracked, {members} member(s): tokens/s", f"{members * tokens_per_member / step:,.0f}", ""),
            (f"tracked, {members} member(s): peak memory", f"{peak / 2**30:.2f} GiB", ""),
            (f"tracked / bare step, {members} member(s)", f"{step / bare_step:.3f}", "<= 1.10"),
            (f"data wait share (bare loop), {members} member(s)", f"{wait:.1%}", "<= 5%"),
            (f"syncs per non-flush step, {members} member(s)", f"{syncs:.2f}", "0"),
        ]
    rows.append(
        (
            f"{ENSEMBLE} in one process vs {ENSEMBLE} x one member",
            f"{ENSEMBLE * results[1] / results[ENSEMBLE]:.1f}x",
            ">= 8x",
        )
    )
    no_data, _ = bare(ENSEMBLE, steps, warmup, "fixed")
    for block in (4, 64):  # on the training device the sampler's time is the step's: 1 - free / with
        with_data, _ = bare(ENSEMBLE, steps, warmup, "device", block)
        share = f"{1 - no_data / with_data:.1%}"
        rows.append((f"data share, device sampler, {ENSEMBLE}, blocks {block}", share, "<= 5%"))
    eager, graphed, equal = device_block_seconds(ENSEMBLE, 4)
    rows.append((f"device sampler, {ENSEMBLE}: ms per block of 4", f"{1000 * eager:.1f}", ""))
    if graphed is not None:
        rows.append(("  the same block as one CUDA graph: ms", f"{1000 * graphed:.1f}", "equal: " + equal))
    compiled, _, _ = tracked(1, steps, warmup, compile=True)
    rows.append(("compile on / off step time, 1 member", f"{compiled / results[1]:.3f}", ""))
    rows.append(
        ("reference run (5000 steps, 1 member), extrapolated", f"{5000 * results[1] / 60:.2f} min", "< 2")
    )
    batched, single = llc_step(ENSEMBLE, 8), llc_step(1, 1)
    rows.append(
        (
            f"llc: {ENSEMBLE} x 8 chains at once vs one at a time",
            f"{ENSEMBLE * 8 * single / batched:.1f}x",
            ">= 20x",
        )
    )
    return rows


def device_block_seconds(members: int, steps_per_block: int, repeats: int = 5):
    """(eager seconds, CUDA-graph seconds or None, whether the graph's block equals the eager one)
    of one block of the device sampler on the reference data. The walk has no data-dependent
    shape, so it can be captured once and replayed with new uniforms: this says whether kernel
    launches dominate it and whether a graph removes them, before the sampler relies on one."""
    import torch

    from devinterp.language.language import device_uniforms

    data, _ = make(members)
    n = steps_per_block * data.batch_size
    seeds = [[seed, 0] for seed in data.stream_seeds]
    uniforms = device_uniforms(n, data.seq_len, seeds, torch.device(DEVICE))
    eager = data.language.sample_from_uniforms(uniforms, n)  # also moves the tables once
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        data.language.sample_from_uniforms(uniforms, n)
    synchronize()
    eager_seconds = (time.perf_counter() - start) / repeats
    if DEVICE != "cuda":
        return eager_seconds, None, ""
    static = torch.zeros_like(uniforms)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture asks
        data.language.sample_from_uniforms(static, n)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            captured = data.language.sample_from_uniforms(static, n)
    except RuntimeError as error:
        return eager_seconds, float("nan"), f"capture failed: {str(error).splitlines()[0][:60]}"
    static.copy_(uniforms)
    graph.replay()
    synchronize()
    equal = all(torch.equal(a, b) for sample, got in zip(eager, captured) for a, b in zip(sample, got))
    start = time.perf_counter()
    for _ in range(repeats):
        static.copy_(uniforms)
        graph.replay()
    synchronize()
    return eager_seconds, (time.perf_counter() - start) / repeats, "yes" if equal else "NO"


def llc_step(members: int, chains: int, draws: int = 60) -> float:
    """Seconds per SGLD step of ``members`` x ``chains`` copies of the quickstart model at once,
    after a warm-up estimate: the difference of a long and a short estimate, so the set-up
    (L(w*) over the pool, the copies) is not counted."""
    import yaml
    from common import ROOT, load_run_config

    from devinterp.language import parse_language
    from devinterp.llc.sampler import SamplerConfig
    from devinterp.llc.snapshots import DataPool, Refinement, snapshot_llc
    from devinterp.model import TensorTransformer
    from devinterp.restore import model_config

    config = load_run_config("quickstart")
    spec = yaml.safe_load((ROOT / config["data"]["language"]).read_text())
    seq_len = config["data"]["seq_len"]
    config["model"].update(d_vocab=parse_language(spec).d_vocab, n_ctx=seq_len)  # as the CLI links them
    model = TensorTransformer(model_config(yaml.safe_dump(config), n_members=members))
    weights = {name: value.detach().numpy() for name, value in model.named_parameters()}
    pool = DataPool.from_spec(spec, 1024, seq_len)
    draws = 3 if DEVICE == "cpu" else draws

    def seconds(n: int) -> float:
        sampler = SamplerConfig(n_beta=14.58, eps=1e-5, chains=chains, draws=n)
        synchronize()
        start = time.perf_counter()
        snapshot_llc(
            yaml.safe_dump(config),
            weights,
            Refinement("model"),
            sampler,
            list(range(members)),
            pool,
            16,
            device=DEVICE,
        )
        synchronize()
        return time.perf_counter() - start

    seconds(2)  # warm-up
    return (seconds(2 * draws) - seconds(draws)) / draws


if __name__ == "__main__":
    sys.exit(main())
