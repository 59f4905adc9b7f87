"""Threads on a shared machine: the cores a process may use, OpenMP's wait policy, and the
tuner behind ``run.threads auto`` (devinterp/threads.py, callbacks/thread_tuning.py)."""

from devinterp.threads import ThreadTuner

import pytest


@pytest.mark.parametrize(
    "files, limit",
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2: 1.5 CPUs
        ({"cpu.max": "max 100000\n"}, None),  # v2, no quota
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, none
        ({}, None),  # no cgroup files at all
    ],
)
def test_the_cgroup_cpu_quota_is_read_in_cores(tmp_path, files, limit):
    from devinterp.threads import cgroup_cpu_limit

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit


def test_a_cgroup_quota_caps_the_cores_below_the_affinity(monkeypatch):
    import os

    from devinterp import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.available_cores() == 2  # 1.5 CPUs rounded up
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.2)
    assert threads.available_cores() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.available_cores() == 8


WAIT_POLICY_CHECK = """
import os, sys, warnings
warnings.simplefilter("always")
{first}
import devinterp
import torch
print(os.environ.get("OMP_WAIT_POLICY"), devinterp.threads.quiet_openmp(), sep="|")
"""


@pytest.mark.parametrize(
    "first, users, printed, warns",
    [
        ("", None, "PASSIVE|PASSIVE", False),  # devinterp first: the quiet policy is in force
        ("", "ACTIVE", "ACTIVE|ACTIVE", False),  # a user's own policy is kept
        ("import torch", None, "PASSIVE|unset (GNU OpenMP spins before it sleeps)", True),
        ("import torch", "ACTIVE", "ACTIVE|ACTIVE", False),  # the user chose: nothing to say
    ],
)
def test_openmp_waits_passively_unless_the_user_says_otherwise(first, users, printed, warns):
    """OpenMP reads its wait policy when torch loads: importing devinterp first sets it, a
    user's own is kept, and torch imported first is named in one warning (children still get it)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if users:
        env["OMP_WAIT_POLICY"] = users
    done = subprocess.run(
        [sys.executable, "-c", WAIT_POLICY_CHECK.format(first=first)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == printed
    warned = [line for line in done.stderr.splitlines() if "imported before devinterp" in line]
    assert len(warned) == (1 if warns else 0), done.stderr


class LoadedMachine:
    """A clock whose step time depends on the thread count in force and on a load that can
    change: ``seconds[load][threads]`` per step."""

    def __init__(self, seconds: dict[str, dict[int, float]]):
        self.seconds, self.load, self.now, self.threads = seconds, "quiet", 0.0, None
        self.applied: list[int] = []

    def apply(self, threads: int) -> None:
        self.threads = threads
        self.applied.append(threads)

    def clock(self) -> float:
        return self.now

    def run(self, tuner: ThreadTuner, steps: int) -> list[int]:
        counts = []
        for _ in range(steps):
            counts.append(tuner.tick())
            self.now += self.seconds[self.load][self.threads]
        return counts


@pytest.mark.parametrize("cores, candidates", [(1, [1]), (2, [1, 2]), (4, [1, 2, 4]), (6, [1, 2, 4, 6])])
def test_the_tuner_tries_one_thread_the_powers_of_two_and_every_core(cores, candidates):
    assert ThreadTuner(cores).candidates == candidates


TRIAL_OF_3 = [1, 1, 1, 2, 2, 2, 2, 1, 1]  # blocks 1 2 2 1: settle + 2 timed, settle + 2, 1, settle + 1


def test_the_tuner_keeps_the_fastest_count_and_follows_a_change_of_load():
    machine = LoadedMachine({"quiet": {1: 0.10, 2: 0.08}, "busy": {1: 0.16, 2: 0.50}})
    tuner = ThreadTuner(2, trial=3, period=20, clock=machine.clock, apply=machine.apply)
    assert tuner.trial_plan() == TRIAL_OF_3
    first = machine.run(tuner, 9)  # the first trial: 3 timed steps per count, in blocks
    assert first == TRIAL_OF_3
    assert machine.run(tuner, 20) == [2] * 20  # the quiet machine's fastest
    assert tuner.history == [(9, 2)]
    machine.load = "busy"  # other jobs start: the next trial finds 1 thread faster
    machine.run(tuner, 9)
    assert machine.run(tuner, 20) == [1] * 20 and tuner.history[-1] == (38, 1)
    assert tuner.used == {1: 5 + 5 + 20, 2: 4 + 20 + 4} and machine.applied[:3] == [1, 2, 1]
    assert "1 thread for 30 steps, 2 threads for 28 steps" in tuner.summary()


@pytest.mark.parametrize("two_threads, chosen", [(0.095, 1), (0.085, 2)])
def test_more_threads_are_kept_only_where_they_are_faster_by_the_margin(two_threads, chosen):
    """2 threads 5% faster than 1: within the 10% margin, so 1 thread is kept (a near tie, and a
    core left to other jobs); 15% faster: 2 threads."""
    machine = LoadedMachine({"quiet": {1: 0.10, 2: two_threads}})
    tuner = ThreadTuner(2, trial=3, period=20, clock=machine.clock, apply=machine.apply)
    assert machine.run(tuner, 9 + 10)[9:] == [chosen] * 10 and tuner.history == [(9, chosen)]


@pytest.mark.parametrize(
    "cores, trial, plan",
    [
        (2, 8, [1] * 5 + [2] * 5 + [2] * 4 + [1] * 5),  # 1 2 2 1: the middle block goes on unsettled
        (4, 2, [1, 1, 2, 2, 4, 4, 4, 2, 2, 1, 1]),  # 1 2 4 4 2 1
        (2, 1, [1, 1, 2, 2]),  # one timed step each: no second round
    ],
)
def test_a_trial_runs_each_count_in_blocks_forward_then_back(cores, trial, plan):
    """Blocks, so a count's steps are timed where it has run a step already (on a loaded machine
    a count that keeps changing runs slower than it would run), in the order A B .. B A, so a load
    that drifts during the trial hits every count alike."""
    assert ThreadTuner(cores, trial=trial).trial_plan() == plan


def test_the_tuner_times_only_settled_steps_of_one_count():
    """A block's first step after a change of count settles and is not timed (its threads may
    start): a count whose first step is slow but whose others are fast still wins."""
    times = iter([5.0, 0.1, 0.1, 0.12, 0.12, 0.12, 0.12, 5.0, 0.1])  # TRIAL_OF_3; 1's settling slow
    now = [0.0]
    applied = []
    tuner = ThreadTuner(2, trial=3, period=100, clock=lambda: now[0], apply=applied.append)
    timed = []
    for _ in range(9):
        tuner.tick()
        timed.append(tuner._measured)  # the count the beginning step is timed for (None: not timed)
        now[0] += next(times)
    tuner.tick()
    assert timed == [None, 1, 1, None, 2, 2, 2, None, 1]
    assert tuner.choice == 1 and applied == [1, 2, 1]


def test_one_core_is_never_tuned():
    applied = []
    tuner = ThreadTuner(1, apply=applied.append)
    assert [tuner.tick() for _ in range(10)] == [1] * 10 and applied == [] and tuner.history == []


def test_a_change_of_load_between_trials_starts_a_trial_early():
    """The chosen count's step time drifts past ``drift``: a trial starts after ``watch`` watched
    steps, not at the next period, and finds the new fastest count."""
    machine = LoadedMachine({"quiet": {1: 0.10, 2: 0.08}, "busy": {1: 0.16, 2: 0.50}})
    tuner = ThreadTuner(2, trial=3, period=200, watch=5, clock=machine.clock, apply=machine.apply)
    machine.run(tuner, 9 + 30)
    assert tuner.choice == 2 and tuner.early_trials == 0  # a steady load: no early trial
    machine.load = "busy"
    counts = machine.run(tuner, 3 + 9 + 10)
    assert counts[:3] == [2] * 3  # the median of the last 5 watched steps: 0.50 after 3 busy ones
    assert counts[3:12] == TRIAL_OF_3  # the early trial
    assert counts[12:] == [1] * 10 and tuner.early_trials == 1
    assert tuner.history == [(9, 2), (9 + 30 + 3 + 9, 1)]
    assert "1 trial early" in tuner.summary()


def test_a_count_picked_by_a_noisy_trial_is_tried_again():
    """Noise in the first trial's few steps makes the slower count look fast (2 threads timed at
    0.05 where they take 0.12): its real steps drift from what the trial saw, so the next trial
    comes at once and keeps the count that is faster (1 thread, 0.10)."""
    first_trial = [0.10, 0.10, 0.10, 0.12, 0.05, 0.05, 0.05, 0.10, 0.10]  # TRIAL_OF_3
    now = [0.0]
    tuner = ThreadTuner(2, trial=3, period=500, watch=5, clock=lambda: now[0], apply=lambda threads: None)
    for step in range(60):
        threads = tuner.tick()
        now[0] += first_trial[step] if step < len(first_trial) else {1: 0.10, 2: 0.12}[threads]
    assert [count for _, count in tuner.history] == [2, 1] and tuner.choice == 1
    assert tuner.early_trials == 1


def test_a_load_that_keeps_changing_cannot_fill_the_run_with_trials():
    """Early trials wait twice as long each time (``watch``, 2, 4, 8 .. x), reset by a periodic trial."""
    machine = LoadedMachine({"quiet": {1: 0.10, 2: 0.08}, "busy": {1: 0.16, 2: 0.50}})
    tuner = ThreadTuner(2, trial=3, period=10_000, watch=4, clock=machine.clock, apply=machine.apply)
    for step in range(2000):
        machine.load = "busy" if (step // 7) % 2 else "quiet"  # flips every 7 steps
        machine.run(tuner, 1)
    assert 1 <= tuner.early_trials <= 9  # waits 4 + 8 + .. + 4 * 2^8 > 2000 steps
    trial_steps = len(tuner.trial_plan()) * (1 + tuner.early_trials)
    assert trial_steps / 2000 < 0.05
