"""``devinterp llc RUN``: LLC estimates at a run's weight snapshots, into ``RUN/llc.h5``.

The file's layout is in devinterp/store/llc_file.py.
"""

from __future__ import annotations

from devinterp.threads import ThreadTuner, available_cores, use_threads

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from devinterp.errors import ArgumentParser
from devinterp.restore import model_config
from devinterp.store.llc_file import (
    FILENAME,
    has_estimate,
    read_estimates,
    record,
    reportable,
    write_estimates,
)

TIMING_STEPS = 8  # SGLD steps timed before the work starts, for the "about N min" line
EPS_COMPARE = (
    "eps sets the discretisation, not the target: estimates at different eps compare only where the "
    "chains of both reached equilibrium (--calibrate flags those too short or not levelled off)"
)


def parse(argv: list[str]):
    parser = ArgumentParser(
        prog="devinterp llc",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Estimate the local learning coefficient (LLC) at a run's weight snapshots: the "
        "whole model, data-refined per primitive and weight-refined per head, every member's chains "
        f"at once. Writes RUN/{FILENAME}; a rerun with the same settings continues where it stopped.",
    )
    parser.add_argument("run", help="a run folder (holding timeline.h5 with weight snapshots)")
    parser.add_argument("--steps", type=int, nargs="*", default=None, help="snapshot steps (default: all)")
    parser.add_argument("--members", type=int, nargs="*", default=None, help="members (default: all)")
    parser.add_argument(
        "--refinements", nargs="*", default=None, help="model, primitives, heads L<l>H<h> (default: all)"
    )
    parser.add_argument(
        "--n-beta",
        type=float,
        default=None,
        help="inverse temperature, the same for every refinement (default: b / log b for the b "
        "predicted tokens of a batch)",
    )
    parser.add_argument("--eps", type=float, default=1e-4, help="SGLD step size")
    parser.add_argument(
        "--eps-for",
        nargs="*",
        default=[],
        metavar="NAME=EPS",
        help="a step size for one refinement (e.g. skip_trigram=1e-5 where its chains diverge at --eps); "
        f"{EPS_COMPARE}",
    )
    parser.add_argument(
        "--redo",
        nargs="*",
        default=[],
        metavar="NAME",
        help="drop the estimates already made for these refinements and make them again (e.g. with "
        "a new --eps-for)",
    )
    parser.add_argument("--gamma", type=float, default=100.0, help="localisation strength")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument(
        "--burn-in",
        type=int,
        default=100,
        help="SGLD steps before the first draw; with --draws, at least the localisation's relaxation "
        "time 2 / (eps gamma) = 200 steps at the defaults, which --calibrate checks",
    )
    parser.add_argument("--sampler", choices=["sgld", "rmsprop"], default="sgld")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per chain and step")
    parser.add_argument("--pool-size", type=int, default=1024, help="sequences in the fixed data pool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the chains run (auto: cuda when there is one; on a GPU every member's chains go in "
        "one pass, on a CPU in passes sized to its cache)",
    )
    parser.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default=None,
        help="send the member-median curves to the run's W&B group as one more segment (job type "
        "'llc'), once every estimate asked for is made (default: the run's run.wandb_mode)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="instead of estimating: sweep --eps-grid x --n-beta-grid on one snapshot (the first of "
        "--steps, or the last) for the whole model, or the first of --refinements (then choose its "
        "--eps-for), plot the loss traces to RUN/llc_calibration.png (llc_calibration_<name>.png), "
        "flag settings whose chains dip below L(w*), diverge or never level off, and print the choice",
    )
    parser.add_argument("--eps-grid", type=float, nargs="*", default=[1e-5, 1e-4, 1e-3])
    parser.add_argument(
        "--n-beta-grid", type=float, nargs="*", default=None, help="default: n_beta x 0.1, 1, 10"
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    import torch
    import yaml

    from devinterp.llc.snapshots import DataPool
    from devinterp.store.timeline import load_timeline

    run = Path(args.run)
    timeline = load_timeline(run / "timeline.h5" if run.is_dir() else run)
    folder = timeline.path.parent
    config = yaml.safe_load(timeline.meta["config"])
    slots, steps = snapshot_steps(timeline, args.steps)
    cfg = model_config(timeline.meta["config"])
    members, chosen, eps_for = chosen_estimates(args, timeline, cfg)
    sampler, settings = sampler_settings(args, int(config["data"]["seq_len"]), members)
    spec_text = timeline.meta.get("language_spec", "")
    spec = yaml.safe_load(spec_text) if spec_text else None
    pool = DataPool.from_run(spec, config["data"], args.pool_size, int(config["data"]["seq_len"]))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda asked for, but torch sees no CUDA device here")
    args.device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    args.device = "cpu" if args.device == "auto" else args.device
    if args.calibrate:
        return calibrate(args, timeline, slots, steps, pool, cfg, sampler, members, folder, sampler.n_beta)
    out = folder / FILENAME
    store = read_estimates(out, settings)  # refuses a file made with other settings, before any work
    for key in [key for key in store if key[1] in args.redo]:
        del store[key]
    check_step_sizes(out, store, eps_for, sampler.eps)
    todo = [(s, r) for s in steps for r in chosen if not has_estimate(store, s, r.name)]
    print(
        f"llc: {len(todo)} estimates to make ({len(steps)} snapshots x {len(chosen)} refinements, "
        f"{len(members)} members x {sampler.chains} chains, n_beta {sampler.n_beta:.4g}; fewer with --steps, "
        "--refinements, --members)",
        file=sys.stderr,
    )
    save = lambda: write_estimates(out, store, settings)  # noqa: E731
    estimate_all(args, timeline, slots, todo, sampler, eps_for, members, pool, save, store)
    mode = args.wandb or config.get("run", {}).get("wandb_mode", "offline")
    if todo and mode != "disabled":
        send_to_wandb(folder, store, config, mode, settings, list(timeline.label_names))
    print(f"llc: {out}")
    return 0


def snapshot_steps(timeline, asked: list[int] | None) -> tuple[dict[int, int], list[int]]:
    """({snapshot step: slot}, the steps to estimate: ``asked``, else every snapshot's)."""
    slots = {int(timeline.snapshot_steps[s]): s for s in np.flatnonzero(timeline.snapshot_steps >= 0)}
    if not slots:
        raise ValueError(
            f"{timeline.path}: no weight snapshots (train with --timeline.n_snapshots N, e.g. 64)"
        )
    steps = sorted(slots) if asked is None else asked
    for step in steps:
        if step not in slots:
            raise ValueError(
                f"--steps: no snapshot at step {step} (snapshots at {', '.join(map(str, sorted(slots)))})"
            )
    return slots, steps


def chosen_estimates(args, timeline, cfg):
    """(members, refinements, {refinement: eps}) asked for, each checked against the run."""
    from devinterp.llc.snapshots import refinements

    members = list(range(cfg.n_members)) if args.members is None else args.members
    for member in members:
        if not 0 <= member < cfg.n_members:
            raise ValueError(f"--members: no member {member} (the run has {cfg.n_members})")
    chosen = refinements(list(timeline.label_names), cfg, args.refinements)
    eps_for = step_sizes(args.eps_for, [r.name for r in chosen])
    for name in args.redo:
        if name not in {r.name for r in chosen}:
            raise ValueError(f"--redo: {name!r} is not among the refinements asked for")
    return members, chosen, eps_for


def sampler_settings(args, seq_len: int, members: list[int]):
    """(SamplerConfig, the settings llc.h5 records and a rerun must repeat)."""
    from devinterp.llc.sampler import SamplerConfig, default_n_beta

    if args.batch_size < 1 or args.pool_size < args.batch_size:
        raise ValueError(
            "--batch-size, --pool-size: need 1 <= batch size <= pool size, "
            f"got {args.batch_size}, {args.pool_size}"
        )
    n_beta = args.n_beta if args.n_beta is not None else default_n_beta(args.batch_size * (seq_len - 1))
    sampler = SamplerConfig(
        n_beta=n_beta,
        eps=args.eps,
        gamma=args.gamma,
        chains=args.chains,
        draws=args.draws,
        burn_in=args.burn_in,
        sampler=args.sampler,
    )
    settings = {
        "sampler": asdict(sampler),
        "members": members,
        "pool_size": args.pool_size,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    return sampler, settings


def estimate_all(args, timeline, slots, todo, sampler, eps_for, members, pool, save, store) -> None:
    """Make every estimate in ``todo`` ((step, refinement) pairs), saving the file after each, with
    a time estimate first, a bar over SGLD steps and one line per estimate."""
    from devinterp.llc.snapshots import snapshot_llc

    cores = available_cores()  # the cores this process may use (affinity and cgroup quota)
    use_threads(cores)
    # as `run.threads auto` in fit: the fastest count, measured every 200 SGLD steps under the load
    # the machine has then (devinterp/threads.py)
    tuner = ThreadTuner(cores) if args.device == "cpu" and cores > 1 else None

    def step_done(done: int, total: int) -> None:
        if tuner is not None:
            tuner.tick()
        bar.update(1)

    steps_each = sampler.burn_in + sampler.draws * sampler.steps_between_draws
    if todo:  # about how long, from a few SGLD steps of the first estimate, before the work starts
        timed = replace(sampler, burn_in=0, draws=TIMING_STEPS, steps_between_draws=1)
        step, refinement = todo[0]
        started = time.time()
        snapshot_llc(
            timeline.meta["config"], timeline.snapshot(slots[step])[1], refinement, timed, members, pool,
            args.batch_size, args.seed, device=args.device,
        )  # fmt: skip
        seconds = (time.time() - started) / TIMING_STEPS * steps_each * len(todo)
        print(
            f"llc: about {seconds / 60:.1f} min for all {len(todo)} (timed on {TIMING_STEPS} SGLD steps of "
            f"the first; {steps_each} steps each)",
            file=sys.stderr,
        )
    with progress_bar(len(todo) * steps_each) as bar:
        for k, (step, refinement) in enumerate(todo):
            started = time.time()
            bar.set_description(f"llc step {step} {refinement.name}")
            _, weights = timeline.snapshot(slots[step])
            estimate = snapshot_llc(
                timeline.meta["config"],
                weights,
                refinement,
                replace(sampler, eps=eps_for.get(refinement.name, sampler.eps)),
                members,
                pool,
                args.batch_size,
                args.seed,
                progress=step_done,
                device=args.device,
            )
            record(store, step, refinement.name, estimate)
            save()
            worst = f", {int(estimate.diverged.sum())} chains diverged" if estimate.diverged.any() else ""
            if estimate.below_init.any():
                below = int(estimate.below_init.sum())
                worst += f", {below} chains below L(w*): not at a minimum, or eps too large"
            bar.write(
                f"llc: [{k + 1}/{len(todo)}] step {step} {refinement.name}: median "
                f"{median_of(estimate.llc):.3g} over members ({time.time() - started:.0f} s{worst})",
                file=sys.stderr,
            )
    if tuner is not None and todo:
        print(tuner.summary("llc threads"), file=sys.stderr)


def step_sizes(pairs: list[str], names: list[str]) -> dict[str, float]:
    """``--eps-for NAME=EPS ...`` -> {refinement: eps}, refused in one line if malformed."""
    found = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            eps = float(value)
        except ValueError:
            eps = float("nan")
        if name not in names or not (eps > 0 and np.isfinite(eps)):
            raise ValueError(
                f"--eps-for: expected NAME=EPS with NAME among the refinements asked for and EPS > 0, "
                f"got {pair!r}"
            )
        found[name] = eps
    return found


def check_step_sizes(path: Path, store: dict, eps_for: dict[str, float], eps: float) -> None:
    """Refuse to mix step sizes within one refinement's curve: estimates already in the file made
    at another eps than the one asked for now (``--redo NAME`` makes them again)."""
    for (step, name), found in store.items():
        there = float(found["eps"])
        asked = eps_for.get(name, eps)
        if not np.isclose(there, asked, rtol=1e-12, atol=0):
            raise ValueError(
                f"{path}: {name} was estimated with eps {there:g} (step {step}), asked {asked:g}; pass "
                f"the same, or --redo {name}"
            )


def progress_bar(total: int):
    """A tqdm bar over every SGLD step of every estimate to make (snapshots x refinements x
    steps; each step moves all chains of all members), on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, unit="sgld step", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def wandb_key(name: str, label_names: list[str]) -> str:
    """W&B's name of a refinement's curve: a primitive's in its own section, like its other curves."""
    return f"{name}/llc" if name in label_names else f"llc/{name}"


def send_to_wandb(
    folder: Path, store: dict, config: dict, mode: str, settings: dict, label_names: list[str]
) -> None:
    """Every estimate in ``store`` as one more segment of the run's W&B group (``<run>@llc``, job
    type 'llc', which resumes of the training ignore), a row per snapshot step at
    ``trainer/global_step``: each refinement's median over members and its IQR, of the estimates
    the report reads (``devinterp.store.llc_file.reportable``: none below L(w*) or diverged), and
    ``<key>_left_out``, how many members' estimates were not; no value where none is left."""
    import wandb

    from devinterp.store.wandb_files import ANALYSIS_JOB

    run = wandb.init(
        dir=str(folder),
        project=config.get("run", {}).get("wandb_project", "devinterp"),
        group=folder.name,
        name=f"{folder.name}@llc",
        job_type=ANALYSIS_JOB,
        mode=mode,
        config={"llc": settings},
    )
    for step in sorted({step for step, _ in store}):
        row: dict[str, float] = {"trainer/global_step": step}
        for (at, name), found in store.items():
            if at != step:
                continue
            values = reportable(found["llc"])
            finite = values[np.isfinite(values)]
            key = wandb_key(name, label_names)
            row[f"{key}_left_out"] = int(values.size - finite.size)
            if len(finite):
                quartiles = np.percentile(finite, [25, 50, 75])
                row[key], row[f"{key}_iqr"] = float(quartiles[1]), float(quartiles[2] - quartiles[0])
        run.log(row)
    run.finish()
    # finish leaves W&B's service running and WANDB_SERVICE pointing at it; a process started from
    # this one later (a resume, a fit) would inherit it and log through this one's service
    wandb.teardown()


def calibrate(args, timeline, slots, steps, pool, cfg, sampler, members, folder, n_beta) -> int:
    """``--calibrate``: the eps x n_beta sweep on one snapshot (see ``parse``)."""
    from devinterp.llc.snapshots import refinements, snapshot_llc

    whole = refinements(list(timeline.label_names), cfg, (args.refinements or [])[:1] or ["model"])[0]
    # a refinement's eps is chosen at the file's n_beta, which every refinement shares
    grid_n_beta = args.n_beta_grid or (
        [n_beta / 10, n_beta, n_beta * 10] if whole.name == "model" else [n_beta]
    )
    for value in args.eps_grid + grid_n_beta:
        if not value > 0:
            raise ValueError(f"--eps-grid, --n-beta-grid: every value must be positive, got {value}")
    step = steps[0] if args.steps else max(slots)
    _, weights = timeline.snapshot(slots[step])
    results = {}
    for beta in grid_n_beta:
        for eps in args.eps_grid:
            setting = replace(sampler, n_beta=beta, eps=eps)
            estimate = snapshot_llc(
                timeline.meta["config"],
                weights,
                whole,
                setting,
                members,
                pool,
                args.batch_size,
                args.seed,
                device=args.device,
            )
            results[(beta, eps)] = (estimate, calibration_flags(estimate))
            flags = ", ".join(results[(beta, eps)][1]) or "ok"
            print(
                f"llc calibrate: {whole.name}, n_beta {beta:.4g} eps {eps:.1e}: "
                f"median {median_of(estimate.llc):.3g} ({flags})",
                file=sys.stderr,
            )
    name = "llc_calibration.png" if whole.name == "model" else f"llc_calibration_{whole.name}.png"
    figure = plot_calibration(results, folder / name, step, whole.name)
    good = [key for key, (_, flags) in results.items() if not flags]
    if good:
        beta, eps = max(good, key=lambda key: (key[1], key[0]))
        print(
            f"llc calibrate: {whole.name}: chosen n_beta {beta:.4g}, eps {eps:.1e} (the largest eps with no "
            f"flag); {figure}"
        )
    else:
        print(f"llc calibrate: every setting is flagged; widen the grids or lengthen --draws; {figure}")
    return 0


def calibration_flags(estimate) -> list[str]:
    """What is wrong with a setting's chains: below L(w*), diverged, not levelled off (the last
    quarter of the draws' mean loss still moves by over 10% of its rise above L(w*) from the
    third), or too short: fewer steps than the localisation's relaxation time 2 / (eps gamma) (in
    flat directions only the gamma term pulls the chain, by eps gamma / 2 a step; RMSProp's
    preconditioner, at most 1, only lengthens it), so the chain cannot have reached equilibrium
    however level its loss looks."""
    flags = []
    config = estimate.config
    steps = config.burn_in + config.draws * config.steps_between_draws
    if config.gamma > 0 and steps < 2 / (config.eps * config.gamma):
        flags.append(f"shorter than 2/(eps gamma) = {2 / (config.eps * config.gamma):.0f} steps")
    if estimate.below_init.any():
        flags.append("below L(w*)")
    if estimate.diverged.any():
        flags.append("diverged")
    trace = estimate.loss_trace  # (member, chain, draw)
    quarter = max(1, trace.shape[2] // 4)
    with np.errstate(all="ignore"):
        third = np.nanmean(trace[:, :, -2 * quarter : -quarter])
        last = np.nanmean(trace[:, :, -quarter:])
        rise = last - float(np.mean(estimate.init_loss))
    if np.isfinite(rise) and abs(last - third) > 0.1 * abs(rise):
        flags.append("not levelled off")
    return flags


def plot_calibration(results: dict, path: Path, step: int, name: str = "model") -> Path:
    """One panel per (n_beta, eps): every chain's L(w) - L(w*) over the draws; flagged settings
    titled in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = sorted({b for b, _ in results})
    epsilons = sorted({e for _, e in results})
    fig, axes = plt.subplots(
        len(betas), len(epsilons), figsize=(3 * len(epsilons), 2.4 * len(betas)), squeeze=False
    )
    for (beta, eps), (estimate, flags) in results.items():
        ax = axes[betas.index(beta), epsilons.index(eps)]
        gap = estimate.loss_trace - estimate.init_loss[:, None, None]
        for trace in gap.reshape(-1, gap.shape[-1]):
            ax.plot(trace, linewidth=0.6)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(
            f"n_beta {beta:.3g}, eps {eps:.0e}\n{', '.join(flags) or 'ok'}",
            fontsize=7,
            color="red" if flags else "black",
        )
        ax.tick_params(labelsize=6)
    fig.suptitle(
        f"LLC calibration ({name}) at step {step}: L(w) - L(w*) per chain over the draws", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def median_of(values: np.ndarray) -> float:
    """The median of the finite values; NaN (not a warning) when there are none."""
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if len(finite) else float("nan")
