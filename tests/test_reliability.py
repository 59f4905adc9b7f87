"""Killed runs lose nothing and resume exactly (issue: Reliability: the record is whole).

Real ``devinterp fit`` processes are SIGKILLed at every phase of a step: before the first flush
(no checkpoint yet: the resume restarts from step 0), just after a flush, in the middle of a
buffer, between a checkpoint and the next flush, inside a commit (a test hook stops the process
after rows are written and before they are marked committed; once in a flush's commit, once in
a checkpoint's), while the timeline is created (before it is SWMR: it must not yet carry the
timeline's name), and once from outside at a random moment; with checkpoint cadences that do (10)
and do not (7) divide the flush cadence (5). Every timeline is written in SWMR mode, so there is
no separate live mode left to vary. They run beside one uninterrupted reference run of the same
config. Every killed timeline must open and hold a prefix of the reference's rows, covering
every step the last checkpoint claims; ``devinterp resume`` must finish it equal to the
reference, row for row and bit for bit (every group, every snapshot, the last step included);
and W&B, read back with W&B's own reader, must hold each step in exactly one history row across
the run's segments, with the keys and values of the uninterrupted run, which are the timeline's.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
import yaml

from analysis import load_timeline
from analysis.onset import primitive_progress
from devinterp.store.wandb_files import history, run_files, run_group
from tests.conftest import ROOT, SEED_SPEC_PATH

MAX_STEPS, FLUSH = 30, 5
GROUPS = ("every_step", "diagnostics", "probe")

# name: (checkpoint cadence, the kill: a tests.helpers.kill callback and its arguments, W&B on)
KILLS = {
    "before-first-flush": (10, ("KillAt", {"step": 3, "at": "batch_end"}), True),
    "after-flush": (10, ("KillAt", {"step": 15, "at": "batch_start"}), True),
    "mid-buffer": (7, ("KillAt", {"step": 18, "at": "batch_end"}), False),
    "after-checkpoint": (7, ("KillAt", {"step": 8, "at": "batch_start"}), True),
    "in-flush-commit": (10, ("KillInCommit", {"step": 20}), True),
    "in-checkpoint-commit": (7, ("KillInCommit", {"step": 13}), False),
    "in-create": (10, ("KillBeforeSwmr", {}), False),
}


def config(root, name, checkpoint=10, kill=None):
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": checkpoint},
        }
    ]
    if kill:
        callbacks.append({"class_path": f"tests.helpers.kill.{kill[0]}", "init_args": kill[1]})
    spec = yaml.safe_load((ROOT / "tests" / "data" / "tiny.yaml").read_text())
    spec["trainer"].update(max_steps=MAX_STEPS, callbacks=callbacks, deterministic=True)
    spec["data"]["language"] = str(SEED_SPEC_PATH)
    spec["circuits"] = {"diagnostics_every_n_steps": 3}
    spec["timeline"] = {"flush_every_n_steps": FLUSH, "n_snapshots": 6}
    spec["run"] = {"name": name, "root": str(root)}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start(*args, wandb=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devinterp",
            *map(str, args),
            "--run.wandb_mode",
            "offline" if wandb else "disabled",
        ],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def rows(path, group):
    timeline = load_timeline(path)
    return timeline.groups[group].steps, timeline.groups[group].values


def snapshots(path):
    with h5py.File(path, "r", swmr=True, libver="latest") as f:
        s = f["snapshots"]
        return {name: s[name][()] for name in s}


def checkpoint_step(folder) -> int:
    """The step the run's last checkpoint claims (0: none)."""
    path = folder / "checkpoints" / "last.ckpt"
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def wandb_rows(folder) -> dict[int, list[dict]]:
    """Every W&B history row of every segment of a run, by trainer/global_step."""
    by_step: dict[int, list[dict]] = {}
    for path in run_files(folder / "wandb"):
        for row in history(path):
            by_step.setdefault(int(row["trainer/global_step"]), []).append(row)
    return by_step


def logged(row: dict) -> dict:
    """The keys a step logged (W&B adds _step, _runtime, _timestamp of its own)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    processes = {"reference": start("fit", "--config", config(root, "reference"), wandb=True)}
    for name, (checkpoint, kill, wandb) in KILLS.items():
        processes[name] = start("fit", "--config", config(root, name, checkpoint, kill), wandb=wandb)
    external = start("fit", "--config", config(root, "external"), wandb=True)
    # the outside kill: once training is under way, at a random moment
    while not (root / "external" / "timeline.h5").exists() and external.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 0.3))  # the 30 steps take 1 to 2 s once the file exists
    external.send_signal(signal.SIGKILL)
    processes["external"] = external
    results = {name: p.communicate(timeout=600) + (p.returncode,) for name, p in processes.items()}
    return root, results


def test_killed_timelines_open_with_a_prefix_of_the_rows_covering_the_checkpoint(killed_runs):
    root, results = killed_runs
    out, err, code = results["reference"]
    assert code == 0, err[-2000:]
    reference = {g: rows(root / "reference" / "timeline.h5", g) for g in GROUPS}
    assert list(reference["every_step"][0]) == list(range(MAX_STEPS + 1))  # the final weights' row
    for name in [*KILLS, "external"]:
        assert results[name][2] == -signal.SIGKILL, (name, results[name][1][-2000:])
        path = root / name / "timeline.h5"
        claimed = checkpoint_step(root / name)
        if name == "in-create":  # killed before the file was valid: it never took the timeline's name
            assert not path.exists() and claimed == 0
            with pytest.raises(OSError):  # marked open for writing without SWMR: no mode opens it
                h5py.File(path.with_name("timeline.h5.partial"), "r", swmr=True, libver="latest")
            continue
        for group in GROUPS:
            steps, values = rows(path, group)
            want_steps, want_values = reference[group]
            np.testing.assert_array_equal(steps, want_steps[: len(steps)], err_msg=f"{name}/{group}")
            np.testing.assert_array_equal(values, want_values[: len(steps)], err_msg=f"{name}/{group}")
            # a checkpoint never claims a step whose rows are not committed
            below = want_steps[want_steps < claimed]
            assert set(below) <= set(steps), (name, group, claimed, sorted(set(below) - set(steps)))
    # killed before the first flush: the file opens, with no rows
    assert len(rows(root / "before-first-flush" / "timeline.h5", "every_step")[0]) == 0
    # killed inside a commit: the rows written but not marked committed are not read back
    assert list(rows(root / "in-flush-commit" / "timeline.h5", "every_step")[0]) == list(range(15))
    assert checkpoint_step(root / "in-checkpoint-commit") == 7  # the checkpoint at 14 never got written
    assert list(rows(root / "in-checkpoint-commit" / "timeline.h5", "every_step")[0]) == list(range(10))


@pytest.fixture(scope="module")
def resumed_runs(killed_runs):
    root, _ = killed_runs
    names = [*KILLS, "external"]
    wandb = {name: KILLS[name][2] if name in KILLS else True for name in names}
    processes = {name: start("resume", root / name, wandb=wandb[name]) for name in names}
    results = {name: p.communicate(timeout=600) + (p.returncode,) for name, p in processes.items()}
    return root, results


def test_resumed_runs_equal_the_uninterrupted_run_bit_for_bit(resumed_runs):
    root, results = resumed_runs
    reference_path = root / "reference" / "timeline.h5"
    for name, (out, err, code) in results.items():
        if name == "external" and "the run already finished" in out + err:  # killed after its last step:
            # refused (code 2), or W&B lacked rows and they were sent (code 0); the last checkpoint
            # comes after the final commit, so the timeline lost nothing
            assert code == (0 if "sending the rest from the timeline" in out else 2), (out, err[-2000:])
        else:
            assert code == 0, (name, err[-3000:])
            assert "resumed at step" in out
            assert "step 0" in out and f"step {MAX_STEPS}" in out  # the summary still starts at 0
        for group in GROUPS:
            steps, values = rows(root / name / "timeline.h5", group)
            want_steps, want_values = rows(reference_path, group)
            assert steps[-1] == MAX_STEPS, (name, group)
            np.testing.assert_array_equal(steps, want_steps, err_msg=f"{name}/{group}")
            np.testing.assert_array_equal(values, want_values, err_msg=f"{name}/{group}")
        got, want = snapshots(root / name / "timeline.h5"), snapshots(reference_path)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} snapshot {key}")
        assert not list((root / name).glob("*.partial"))
    notice = results["before-first-flush"][0] + results["before-first-flush"][1]
    assert notice.count("no checkpoint yet; restarting the run from step 0") == 1


def test_wandb_holds_each_step_once_with_the_timelines_values(resumed_runs):
    root, results = resumed_runs
    reference = wandb_rows(root / "reference")
    assert sorted(reference) == list(range(MAX_STEPS + 1))
    assert all(len(r) == 1 for r in reference.values())  # one step, one history row
    # the uninterrupted run's W&B rows are the timeline's summaries, recomputed here
    timeline = load_timeline(root / "reference" / "timeline.h5")
    loss = np.nanmedian(timeline.values("train/loss"), axis=-1)
    bigram = np.median(primitive_progress(timeline, "bigram", "weight")[1], axis=-1)  # blind, a ratio of sums
    for row, step in enumerate(timeline.steps("every_step")):
        values = reference[int(step)][0]
        assert values["bigram/weight_progress"] == pytest.approx(bigram[row], rel=1e-5, abs=1e-6)
        if step < MAX_STEPS:
            assert values["train/loss"] == pytest.approx(loss[row], rel=1e-6)
        else:  # the final weights train on no batch: no training loss is logged
            assert "train/loss" not in values
    probe = np.median(timeline.values("probe_excess/bigram"), axis=-1)
    for row, step in enumerate(timeline.steps("probe_excess/bigram")):
        assert reference[int(step)][0]["bigram/probe_excess"] == pytest.approx(probe[row], rel=1e-6)
    # every killed-and-resumed run: across its segments, each step once, the same keys and values
    for name in [n for n, (_, _, wandb) in KILLS.items() if wandb] + ["external"]:
        segments = run_files(root / name / "wandb")
        got = wandb_rows(root / name)
        if "the run already finished" in results[name][1]:  # the outside kill came after the last step
            assert len(segments) == 1, name  # and W&B held every step: nothing to send, no segment
        else:
            assert len(segments) >= 2 and {run_group(p) for p in segments[1:]} == {name}, name
        assert sorted(got) == list(range(MAX_STEPS + 1)), (name, sorted(got))
        for step, found in got.items():
            assert len(found) == 1, (name, step, len(found))
            assert logged(found[0]) == logged(reference[step][0]), (name, step)


def test_resume_refuses_a_finished_run(resumed_runs):
    root, _ = resumed_runs
    process = start("resume", root / "reference")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2
    assert len(err.strip().splitlines()) == 1 and "the run already finished (step 30" in err
    assert "Traceback" not in err


def test_resume_of_a_finished_run_sends_the_rows_its_wandb_files_lost(resumed_runs, tmp_path):
    """A W&B writer killed while the run finished loses its last rows, though the timeline and the
    last checkpoint are whole: resume sends those rows from the timeline, without training, and
    only those; once W&B holds every step, resume refuses the finished run."""
    root, _ = resumed_runs
    run = tmp_path / "reference"
    shutil.copytree(root / "reference", run, symlinks=True)
    (segment,) = run_files(run / "wandb")
    os.truncate(segment, int(segment.stat().st_size * 0.6))  # as a killed writer leaves it
    kept = sorted(wandb_rows(run))
    assert 0 < len(kept) < MAX_STEPS + 1
    before = (run / "timeline.h5").read_bytes(), (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    process = start("resume", run, wandb=True)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert f"hold steps only through {kept[-1]}" in out
    # no training: the timeline is read, never written, and no checkpoint is saved
    assert (
        (run / "timeline.h5").read_bytes(),
        (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns,
    ) == before
    reference, got = wandb_rows(root / "reference"), wandb_rows(run)
    assert sorted(got) == list(range(MAX_STEPS + 1))
    for step, found in got.items():
        assert len(found) == 1 and logged(found[0]) == logged(reference[step][0]), step
    process = start("resume", run, wandb=True)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2 and "the run already finished (step 30" in err


@pytest.mark.slow
def test_twenty_random_kill_times_resume_to_the_uninterrupted_run(tmp_path):
    """20 runs, each SIGKILLed from outside at a random moment of its 30 steps, then resumed:
    every one equals the uninterrupted run, and W&B holds each step once."""
    draws = random.Random(20)
    reference = start("fit", "--config", config(tmp_path, "reference"), wandb=True)
    assert reference.wait(timeout=600) == 0
    want = {g: rows(tmp_path / "reference" / "timeline.h5", g) for g in GROUPS}
    kill_times = []
    for k in range(20):
        name = f"random-{k}"
        process = start(
            "fit", "--config", config(tmp_path, name, checkpoint=draws.choice([7, 10])), wandb=True
        )
        while not (tmp_path / name / "timeline.h5").exists() and process.poll() is None:
            time.sleep(0.02)
        kill_times.append(draws.uniform(0.0, 6.0))
        time.sleep(kill_times[-1])
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        resumed = start("resume", tmp_path / name, wandb=True)
        out, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0 or "already finished" in err, (name, err[-2000:])  # W&B whole
        for group in GROUPS:
            steps, values = rows(tmp_path / name / "timeline.h5", group)
            np.testing.assert_array_equal(steps, want[group][0], err_msg=f"{name}/{group}")
            np.testing.assert_array_equal(values, want[group][1], err_msg=f"{name}/{group}")
        got = wandb_rows(tmp_path / name)
        assert sorted(got) == list(range(MAX_STEPS + 1)) and all(len(r) == 1 for r in got.values()), name
    print("kill times after the file appeared (s):", [round(t, 2) for t in kill_times])
