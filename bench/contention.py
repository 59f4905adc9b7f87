"""Threads on a shared machine: the default setting against every thread count, alone and under load.

Runs the quickstart's step loop (4 members, 2 layers, d_model 64, batch 32 x 64: sample, forward,
backward, AdamW; bench/tracking_overhead.py's bare loop) with

  default   ``run.threads auto``: the package's environment (OpenMP waiting passively, BLAS
            capped) and its thread tuner (devinterp/threads.py), ticked every step as `devinterp
            fit` ticks it; its first trial (8 timed steps per count, in blocks) is part of the
            warm-up, and the cost of the later periodic trials (one every 200 steps) is printed
            beside it, from the rows; an early trial (the chosen count's step time drifted) falls
            in the timed steps
  1 .. N    that many threads, the same environment (N: the cores this process may use)
  before    torch imported before the package, torch's own thread count: OpenMP's default
            spin-then-sleep policy, as every run had before the package set its wait policy

alone and beside 1 and 3 competing processes that this script starts itself: the same loop with
torch's defaults, as other people's jobs would run it, the second and third spinning
(``OMP_WAIT_POLICY=ACTIVE``). ``default`` and the counts run in one process, in alternating
blocks of ``--block`` steps (``paired_seconds``), so the machine's drift hits them alike;
``before`` needs a process of its own (its wait policy is fixed when torch loads). Loads are
repeated; each figure is the median over repeats of the mean seconds per step after a warm-up.
Prints, per load, every setting's time, default / best (target <= 1.10 in every row), the
tuner's later trials as a share of a step, and before / best.

    python bench/contention.py [--steps 60] [--block 10] [--warmup 4] [--repeats 2] [--loads 0 1 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPIN = {"OMP_WAIT_POLICY": "ACTIVE"}
COMPETITOR_SPIN = (False, True, True)  # the first competitor waits as OpenMP does by default


PACKAGE_ENV = ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def child_env(spin: bool = False) -> dict[str, str]:
    """The environment of a child: this one without the package's settings (a child that sets
    them does so itself), plus ACTIVE waiting for a spinning competitor."""
    env = {k: v for k, v in os.environ.items() if k not in PACKAGE_ENV}
    return {**env, **(SPIN if spin else {})}


def measure_command(settings: str, steps: int, warmup: int, block: int) -> list[str]:
    """The child that times ``steps`` steps of each of ``settings`` (``before``, or the in-process
    settings joined by commas)."""
    args = ["--measure", settings, "--steps", str(steps), "--warmup", str(warmup), "--block", str(block)]
    if settings == "before":  # torch first: the package's wait policy can no longer take effect
        return torch_first(args)
    return [sys.executable, str(Path(__file__).resolve()), *args]


def torch_first(args: list[str]) -> list[str]:
    """This script with ``args`` in a process that imports torch before anything else."""
    script = str(Path(__file__).resolve())
    code = f"import sys, torch, runpy; sys.argv = {[script, *args]!r}; "
    code += f"runpy.run_path({script!r}, run_name='__main__')"
    return [sys.executable, "-W", "ignore", "-c", code]


def start_competitors(count: int) -> list[subprocess.Popen]:
    """``count`` processes running the loop with torch's defaults (torch imported first) until
    stopped; all but the first spin."""
    return [
        subprocess.Popen(
            torch_first(["--compete"]),
            env=child_env(spin=COMPETITOR_SPIN[i % len(COMPETITOR_SPIN)]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(count)
    ]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()


def step_loop():
    """The quickstart's bare step loop (bench/tracking_overhead.py) as a generator of step times."""
    sys.path.insert(0, str(HERE))
    from tracking_overhead import bare_steps

    return bare_steps(4)


def paired_seconds(settings: list[str], steps: int, warmup: int, block: int) -> dict[str, float]:
    """Seconds per step of every in-process setting (``default`` and the counts), measured in one
    loop in alternating blocks of ``block`` timed steps, the settings shuffled in every round, so
    a change of the machine's speed or of a competitor's phase hits every setting alike (measured
    in separate processes one after the other, the same setting differed by up to 1.5x here).
    Each block starts with one untimed step at its count (the threads settle). The tuner sees
    only its own steps: its clock advances by their times alone, and its count is restored at the
    start of each of its blocks, so it runs as in one uninterrupted run."""
    from devinterp.threads import ThreadTuner, available_cores, set_torch_threads, use_threads

    tuner_seconds = [0.0]
    tuner = ThreadTuner(available_cores(), clock=lambda: tuner_seconds[0])
    use_threads(tuner.current)
    loop = step_loop()
    for _ in range(len(tuner.trial_plan()) + warmup):  # its first trial is part of the warm-up
        tuner.tick()
        tuner_seconds[0] += next(loop)
    times: dict[str, list[float]] = {setting: [] for setting in settings}
    rng = random.Random(1)
    for _ in range(math.ceil(steps / block)):
        for setting in rng.sample(settings, len(settings)):
            set_torch_threads(tuner.current if setting == "default" else int(setting))
            next(loop)  # settles, untimed
            tuned = setting == "default"
            for _ in range(block):
                if tuned:
                    tuner.tick()
                seconds = next(loop)
                tuner_seconds[0] += seconds if tuned else 0.0
                times[setting].append(seconds)
    return {setting: sum(seconds) / len(seconds) for setting, seconds in times.items()}


def run_child(args) -> int:
    if args.compete:
        for _ in step_loop():
            pass
    if args.measure == "before":  # torch's own thread count and wait policy, BLAS untouched
        loop = step_loop()
        times = [next(loop) for _ in range(args.warmup + args.steps)][args.warmup :]
        print(json.dumps({"before": sum(times) / len(times)}))
        return 0
    print(json.dumps(paired_seconds(args.measure.split(","), args.steps, args.warmup, args.block)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--block", type=int, default=10, help="timed steps of a setting in a row")
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 3], help="competing processes")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compete", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure or args.compete:
        return run_child(args)

    sys.path.insert(0, str(HERE))
    from devinterp.threads import ThreadTuner, available_cores

    from common import report

    cores = available_cores()
    plan = ThreadTuner(cores).trial_plan()
    settings = ["default", *map(str, range(1, cores + 1)), "before"]
    times: dict[tuple[int, str], list[float]] = {}
    rng = random.Random(0)
    print(
        f"contention: {cores} cores available, {args.steps} timed steps after {args.warmup} "
        f"(in-process settings in alternating blocks of {args.block}), "
        f"median of {args.repeats}; competitors: the same loop with torch's defaults, spinning: "
        f"{[spin for spin in COMPETITOR_SPIN]}",
        flush=True,
    )
    in_process = ",".join(s for s in settings if s != "before")
    for repeat in range(args.repeats):
        for load in args.loads:
            competitors = start_competitors(load)
            try:
                time.sleep(3 if load else 0)  # let them get going
                for group in rng.sample([in_process, "before"], 2):
                    done = subprocess.run(
                        measure_command(group, args.steps, args.warmup, args.block),
                        env=child_env(),
                        capture_output=True,
                        text=True,
                    )
                    if done.returncode != 0:
                        print(done.stderr[-3000:], file=sys.stderr)
                        return 1
                    for setting, seconds in json.loads(done.stdout.splitlines()[-1]).items():
                        times.setdefault((load, setting), []).append(seconds)
                        print(
                            f"  repeat {repeat} load {load} {setting:>8}: {seconds * 1000:8.1f} ms/step",
                            flush=True,
                        )
            finally:
                stop(competitors)
    head = "".join(f"{s:>10}" for s in settings)
    print(f"\n{'competing':<10}{head}{'default/best':>14}{'trials':>8}{'before/best':>13}   (ms per step)")
    worst = 0.0
    for load in args.loads:
        median = {s: statistics.median(times[load, s]) for s in settings}
        best = min(median[s] for s in settings if s != "before")
        ratio, before = median["default"] / best, median["before"] / best
        # the tuner's later trials: its plan's steps at every count, once per 200 steps
        counts = [s for s in settings if s.isdigit()]
        trials = sum(plan.count(int(c)) * (median[c] - median["default"]) for c in counts) / (
            200 * median["default"]
        )
        worst = max(worst, ratio * (1 + max(trials, 0.0)))
        row = "".join(f"{median[s] * 1000:>10.1f}" for s in settings)
        print(f"{load:<10}{row}{ratio:>14.2f}{trials:>+8.1%}{before:>13.2f}")
        report(f"contention default/best, {load} competing", ratio, "<= 1.10")
        report(f"contention before/best, {load} competing", before)
    print(f"\nworst default/best, its later trials included: {worst:.2f} (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
