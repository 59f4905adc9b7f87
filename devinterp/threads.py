"""Compute threads that never oversubscribe a shared machine.

Two causes of slow runs on a machine other jobs share, both measured on 2 cores beside three
other training processes (40 quickstart steps: 247 s with torch's defaults, 55 s with one thread):

- **Spinning.** The torch CPU wheel ships GNU OpenMP, whose idle workers spin for a long time
  before they sleep and cannot see other processes; numpy and scipy's OpenBLAS spin the same way.
  ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep at once (52 s in the same check). OpenMP reads the
  variable once, when torch's library loads, so it must be in the environment before the first
  ``import torch``: every entry point (the three packages, tests/conftest.py, bench/) imports
  this module first, and ``quiet_openmp`` sets it unless the user set it already.
- **Counting cores the process may not use.** torch counts the machine's cores; a job scheduler
  grants fewer through the affinity mask or a cgroup CPU quota. ``available_cores`` counts both.

Torch-free, so it can run before torch is imported; ``use_threads`` imports it when called.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

WAIT_POLICY = "OMP_WAIT_POLICY"
QUIET_POLICY = "PASSIVE"
GNU_DEFAULT = "unset (GNU OpenMP spins before it sleeps)"

# the wait policy OpenMP runs with in this process: read when torch loads, so fixed by then
_policy_in_force: str | None = None


def quiet_openmp() -> str:
    """Put ``OMP_WAIT_POLICY=PASSIVE`` in the environment unless the user set a policy of their
    own (theirs is kept), and return the policy OpenMP runs with in this process. Where torch was
    imported before this ran, the setting can no longer take effect here (child processes still
    get it): one warning says so, once per process."""
    global _policy_in_force
    if _policy_in_force is not None:
        return _policy_in_force
    users = os.environ.get(WAIT_POLICY)
    os.environ.setdefault(WAIT_POLICY, QUIET_POLICY)
    if "torch" in sys.modules:
        _policy_in_force = users or GNU_DEFAULT
        if users is None:
            warnings.warn(
                f"torch was imported before devinterp, so {WAIT_POLICY}={QUIET_POLICY} cannot take effect in "
                "this process (idle OpenMP threads spin and slow a shared machine): import devinterp first, "
                f"or set {WAIT_POLICY}={QUIET_POLICY} in the environment",
                RuntimeWarning,
                stacklevel=3,
            )
    else:
        _policy_in_force = os.environ[WAIT_POLICY]
    return _policy_in_force


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (quota / period), or None where there is
    none: cgroup v2's ``cpu.max`` ("max 100000" is no limit), else v1's ``cpu.cfs_quota_us`` (-1 is
    no limit) over ``cpu.cfs_period_us``."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """The cores this process may use: its affinity (a job scheduler's allocation), capped by its
    cgroup's CPU quota rounded up (a container limited to 1.5 CPUs gets 2 threads); not the
    machine's count, which is what torch's own default counts."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


def use_threads(threads: int) -> None:
    """Compute with ``threads`` threads for the rest of the process: torch (now if it is loaded,
    else through ``OMP_NUM_THREADS`` when it loads, unless the user set that) and numpy and scipy's
    BLAS (threadpoolctl for the libraries loaded, ``OPENBLAS_NUM_THREADS`` for those loaded later)."""
    import numpy  # noqa: F401  (threadpoolctl limits the BLAS libraries already loaded)
    from threadpoolctl import threadpool_limits

    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    threadpool_limits(limits=threads, user_api="blas")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def in_force(tuned_over: list[int] | None = None) -> str:
    """What this process computes with, as the timeline's ``meta/compute`` records it (YAML):
    torch's threads (now), the counts a ``ThreadTuner`` chooses among (``tuned_over``; empty: a set
    count), the BLAS libraries' threads, OpenMP's wait policy and the cores available."""
    from threadpoolctl import threadpool_info

    blas = sorted({int(pool["num_threads"]) for pool in threadpool_info() if pool["user_api"] == "blas"})
    torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    return (
        f"torch_threads: {torch_threads}\n"
        f"tuned_over: {list(tuned_over or [])}\n"
        f"blas_threads: {blas}\n"
        f"wait_policy: {quiet_openmp()}\n"
        f"available_cores: {available_cores()}\n"
    )


def set_torch_threads(threads: int) -> None:
    """torch's threads alone: cheap enough to switch every step (threadpoolctl's look-up of the
    loaded BLAS libraries is not, and training computes in torch)."""
    sys.modules["torch"].set_num_threads(threads)


class ThreadTuner:
    """``run.threads auto`` on a CPU: the fastest thread count, measured while the job runs.

    Which count is fastest depends on the model's size and on what else the machine runs, and the
    latter changes during a run: on 2 cores with OpenMP waiting passively, the quickstart's step
    ran fastest with 1 thread on a quiet machine and with 2 beside another job (bench/contention.py).
    So every ``period`` steps each candidate count runs ``trial`` timed steps (in blocks, forward then
    back: ``trial_plan``) and the fewest threads whose median step time is within ``margin`` of the
    fastest count's are used until the next trial: a thread that buys less than that is not worth
    taking from the other jobs, and near a tie a trial's few steps cannot tell the counts apart
    (beside one other job on 2 cores, 1 and 2 threads ran within 10% of each other and the trials
    kept switching between them: 1.14 times the faster count's step; bench/contention.py).
    Between trials the chosen count's steps are watched: where the median of its last ``watch``
    steps is more than ``drift`` times slower or faster than the trial measured it (the load
    changed, or a few noisy steps picked the wrong count), a trial starts at once instead of at
    the next period. Each such early trial doubles the steps the next one waits for (reset by a
    periodic trial), so a load that keeps changing cannot fill the run with trials.
    Candidates: 1, the powers of two below ``cores``, and ``cores``. Call ``tick()`` at the start of
    every step: the time between two ticks is the step's."""

    def __init__(
        self,
        cores: int,
        trial: int = 8,
        period: int = 200,
        clock: Callable[[], float] = time.perf_counter,
        apply: Callable[[int], None] | None = None,
        watch: int = 16,
        drift: float = 1.3,
        margin: float = 0.1,
    ):
        self.candidates = sorted({1, cores, *(2**k for k in range(1, cores.bit_length()) if 2**k < cores)})
        self.trial, self.period, self.clock = trial, period, clock
        self.watch, self.drift, self.margin = watch, drift, margin
        self.apply = apply or set_torch_threads
        self.choice = self.current = cores
        self.steps = 0  # ticks so far
        self.used: dict[int, int] = {}  # steps run with each count
        self.history: list[tuple[int, int]] = []  # (step, count chosen there)
        self._plan: list[int] = []  # the thread counts of the coming trial steps
        self._samples: dict[int, list[float]] = {}
        self._measured: int | None = None  # the count the running step is timed for
        self._last: float | None = None
        self._next_trial = 0
        self.early_trials = 0  # trials started by a drift of the chosen count's step time
        self._reference: float | None = None  # the chosen count's median step in the last trial
        self._watched: list[float] = []  # the chosen count's settled steps since that trial
        self._wait = watch  # watched steps the next early trial needs
        self._settled = False  # the running step kept the previous step's count

    def tick(self) -> int:
        """The step that just ended is timed; returns the thread count of the step that begins."""
        now = self.clock()
        if self._last is not None:
            if self._measured is not None:
                self._samples.setdefault(self._measured, []).append(now - self._last)
            elif self._settled and not self._plan and self.current == self.choice:
                self._watched.append(now - self._last)
        self._last = now
        if not self._plan and self._samples:  # a trial just ended: the fewest threads near the fastest win
            medians = {count: statistics.median(steps) for count, steps in self._samples.items()}
            fastest = min(medians.values())
            self.choice = min(
                count for count, median in medians.items() if median <= fastest * (1 + self.margin)
            )
            self._reference = medians[self.choice]
            self.history.append((self.steps, self.choice))
            self._samples, self._watched = {}, []
        if not self._plan and len(self.candidates) > 1:
            early = self._drifted()
            if early or self.steps >= self._next_trial:
                # an early trial doubles the wait before the next; a periodic one resets it
                self._wait = self._wait * 2 if early else self.watch
                self.early_trials += early
                self._plan = self.trial_plan()
                self._next_trial = self.steps + len(self._plan) + self.period
        trial_step = bool(self._plan)
        threads = self._plan.pop(0) if trial_step else self.choice
        self._settled = threads == self.current
        # a step right after a change of count settles (the new threads start) and is not timed
        self._measured = threads if trial_step and self._settled else None
        if threads != self.current:
            self.apply(threads)
            self.current = threads
        self.used[threads] = self.used.get(threads, 0) + 1
        self.steps += 1
        return threads

    def trial_plan(self) -> list[int]:
        """The counts of the coming trial's steps: every candidate in a block, the candidates in
        order and then in reverse (A B .. B A), half of each count's ``trial`` timed steps in each
        round, so a load that drifts during the trial hits every count alike. Blocks, not
        alternate steps: a step right after a change of count is not timed, and on a loaded
        machine a count's steps run slower while the count keeps changing (2 threads beside one
        other job: 142 ms a step in a block, about 220 alternating with 1 thread), which made
        alternate steps pick 1 thread where 2 were faster."""
        first, second = (self.trial + 1) // 2, self.trial // 2
        plan: list[int] = []
        rounds = [(count, first) for count in self.candidates]
        rounds += [(count, second) for count in reversed(self.candidates) if second]
        for count, timed in rounds:
            settle = 0 if plan and plan[-1] == count else 1
            plan += [count] * (settle + timed)
        return plan

    def _drifted(self) -> bool:
        """The chosen count's last ``watch`` steps ran more than ``drift`` times slower or faster
        than its trial measured, after at least ``_wait`` watched steps."""
        if self._reference is None or len(self._watched) < max(self.watch, self._wait):
            return False
        ratio = statistics.median(self._watched[-self.watch :]) / self._reference
        return ratio > self.drift or ratio < 1 / self.drift

    def summary(self, name: str = "run.threads auto") -> str:
        """One line: the steps each count ran, and how the counts were chosen."""
        used = ", ".join(
            f"{count} thread{'s' * (count > 1)} for {n} steps" for count, n in sorted(self.used.items())
        )
        return (
            f"{name}: {used or 'no steps'} (each of {self.candidates} timed for {self.trial} steps "
            f"every {self.period}, the fewest within {self.margin:.0%} of the fastest kept; "
            f"{self.early_trials} trial{'s' * (self.early_trials != 1)} early, on a change of step time)"
        )
