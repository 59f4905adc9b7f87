"""Killed runs lose nothing and resume exactly (issue: Reliability).

Real ``devinterp fit`` processes are SIGKILLed at chosen steps (just after a flush, in the middle
of a buffer, just after a checkpoint, before any checkpoint, and once from outside at a random
moment), in normal and in live mode; they run side by side with one uninterrupted reference run
of the same config. Every killed timeline must open and hold exactly the reference's rows up to
its last flush; ``devinterp resume`` must finish it with every step once and every value equal to
the reference, and W&B must get a new offline segment in the same group with no step twice.
"""

import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import yaml

from analysis import load_timeline
from devinterp.wandb_files import history, run_group
from tests.conftest import ROOT, SEED_SPEC_PATH

MAX_STEPS, FLUSH, CHECKPOINT = 30, 5, 10
GROUPS = ("every_step", "diagnostics", "probe")

# name: (live, kill step, kill at, resume, wandb)
KILLS = {
    "after-flush": (False, 15, "batch_start", True, True),
    "mid-buffer": (False, 18, "batch_end", True, False),
    "after-checkpoint": (False, 20, "batch_start", True, False),
    "before-checkpoint": (False, 7, "batch_end", False, False),
    "live-after-flush": (True, 25, "batch_start", True, False),
    "live-mid-buffer": (True, 13, "batch_end", True, True),
}


def config(root, name, live, kill=None):
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": CHECKPOINT},
        }
    ]
    if kill:
        callbacks.append({"class_path": "tests.kill.KillAt", "init_args": {"step": kill[0], "at": kill[1]}})
    spec = yaml.safe_load((ROOT / "tests" / "data" / "tiny.yaml").read_text())
    spec["trainer"].update(max_steps=MAX_STEPS, callbacks=callbacks, deterministic=True)
    spec["data"]["language"] = str(SEED_SPEC_PATH)
    spec["circuits"] = {"diagnostics_every_n_steps": 3}
    spec["timeline"] = {"flush_every_n_steps": FLUSH, "live": live, "n_snapshots": 6}
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
    with h5py.File(path, "r") as f:
        s = f["snapshots"]
        return {name: s[name][()] for name in s}


def flushed_through(step, at):
    """The last flush before a kill at ``step`` (KillAt runs before the metric callbacks)."""
    return (step // FLUSH) * FLUSH if at == "batch_start" else ((step - 1) // FLUSH) * FLUSH


def expected_prefix(reference, group, flushed):
    steps, values = reference[group]
    keep = (
        steps <= flushed if group == "probe" else steps < flushed
    )  # probe rows at a flush step commit with it
    return steps[keep], values[keep]


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    processes = {"reference": start("fit", "--config", config(root, "reference", False), wandb=True)}
    for name, (live, step, at, _, wandb) in KILLS.items():
        processes[name] = start("fit", "--config", config(root, name, live, (step, at)), wandb=wandb)
    external = start("fit", "--config", config(root, "external", False), "--trainer.max_steps", "200")
    # the outside kill: once training is under way, at a random moment
    while not (root / "external" / "timeline.h5").exists() and external.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.5, 2.0))
    external.send_signal(signal.SIGKILL)
    processes["external"] = external
    results = {name: p.communicate(timeout=600) + (p.returncode,) for name, p in processes.items()}
    return root, results


def test_killed_timelines_open_with_every_row_up_to_the_last_flush(killed_runs):
    root, results = killed_runs
    out, err, code = results["reference"]
    assert code == 0, err[-2000:]
    reference = {g: rows(root / "reference" / "timeline.h5", g) for g in GROUPS}
    assert list(reference["every_step"][0]) == list(range(MAX_STEPS))
    for name, (live, step, at, _, _) in KILLS.items():
        assert results[name][2] == -signal.SIGKILL, (name, results[name][1][-2000:])
        path = root / name / "timeline.h5"
        flushed = flushed_through(step, at)
        for group in GROUPS:
            steps, values = rows(path, group)
            want_steps, want_values = expected_prefix(reference, group, flushed)
            np.testing.assert_array_equal(steps, want_steps, err_msg=f"{name}/{group}")
            np.testing.assert_array_equal(values, want_values, err_msg=f"{name}/{group}")
    # killed from outside at a random moment: whatever was committed is a prefix of the reference run
    assert results["external"][2] == -signal.SIGKILL
    steps, values = rows(root / "external" / "timeline.h5", "every_step")
    assert len(steps) % FLUSH == 0 and list(steps) == list(range(len(steps)))
    n = min(len(steps), MAX_STEPS)
    np.testing.assert_array_equal(values[:n], reference["every_step"][1][:n])


@pytest.fixture(scope="module")
def resumed_runs(killed_runs):
    root, _ = killed_runs
    logged_before = {}
    for name in KILLS:
        with h5py.File(
            root / name / "timeline.h5", "r", swmr=KILLS[name][0], libver="latest" if KILLS[name][0] else None
        ) as f:
            logged_before[name] = int(f["meta/logged_through"][0])
    processes = {
        name: start("resume", root / name, wandb=wandb)
        for name, (_, _, _, resume, wandb) in KILLS.items()
        if resume
    }
    results = {name: p.communicate(timeout=600) + (p.returncode,) for name, p in processes.items()}
    return root, results, logged_before


def test_resumed_runs_have_every_step_once_and_equal_the_uninterrupted_run(resumed_runs):
    root, results, _ = resumed_runs
    reference_path = root / "reference" / "timeline.h5"
    for name, (out, err, code) in results.items():
        assert code == 0, (name, err[-3000:])
        assert "resumed at step" in out
        for group in GROUPS:
            steps, values = rows(root / name / "timeline.h5", group)
            want_steps, want_values = rows(reference_path, group)
            np.testing.assert_array_equal(steps, want_steps, err_msg=f"{name}/{group}")
            np.testing.assert_array_equal(values, want_values, err_msg=f"{name}/{group}")
        got, want = snapshots(root / name / "timeline.h5"), snapshots(reference_path)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} snapshot {key}")
        # the summary still starts at step 0, and the folder keeps the config the run was started with
        assert "step 0" in out and f"step {MAX_STEPS}" in out
        assert not list((root / name).glob("*.resume"))


def test_resumed_wandb_segment_shares_the_group_and_repeats_no_step(resumed_runs):
    root, _, logged_before = resumed_runs
    reference = history(next((root / "reference" / "wandb").glob("offline-run-*/run-*.wandb")))
    reference_steps = sorted({row["trainer/global_step"] for row in reference})
    for name in ("after-flush", "live-mid-buffer"):
        files = sorted(
            (root / name / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime
        )
        assert len(files) == 2, files
        assert run_group(files[1]) == name and run_group(files[0]) in (
            name,
            None,
        )  # None: killed before writing
        first, second = ({row["trainer/global_step"] for row in history(f)} for f in files)
        assert not first & second  # no step twice across segments
        assert max(first, default=-1) <= logged_before[name]
        # together they hold every step the uninterrupted run logged: the new segment sends again,
        # from the timeline, whatever the killed process's W&B writer had not put on disk
        assert sorted(first | second) == reference_steps
        rows = history(files[1])
        assert all(len(row) > 3 for row in rows)  # whole rows: summaries, not fragments


def test_resume_refuses_a_run_without_checkpoint_and_a_finished_run(resumed_runs):
    root, _, _ = resumed_runs
    before = sorted(p.name for p in (root / "before-checkpoint").rglob("*"))
    for folder, message in (
        (root / "before-checkpoint", "no checkpoint"),
        (root / "reference", "the run already finished (step 30"),
    ):
        process = start("resume", folder)
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2
        assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert sorted(p.name for p in (root / "before-checkpoint").rglob("*")) == before
