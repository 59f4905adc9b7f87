"""Two processes (DDP over gloo on CPU) train what one process trains (issue: Speed and scale).

``data.batch_size`` is the global batch: each process trains on its half of the same stream,
gradients are averaged, and the per-primitive training losses are all-reduced. Only global rank
zero writes the run folder, the timeline and W&B.
"""

import os
import subprocess
import sys

import numpy as np

from analysis import load_timeline
from devinterp.cli import main
from tests.conftest import ROOT, SEED_SPEC_PATH

TINY = ROOT / "tests" / "data" / "tiny.yaml"
STEPS = 12


def fit_args(root, name):
    return [
        "fit",
        "--config",
        str(TINY),
        "--run.root",
        str(root),
        "--run.name",
        name,
        "--data.language",
        str(SEED_SPEC_PATH),
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.enable_progress_bar",
        "false",
    ]


def test_ddp_on_two_processes_matches_one_process(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "devinterp",
            *fit_args(tmp_path, "two"),
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--run.wandb_mode",
            "offline",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "All distributed processes registered. Starting with 2 processes" in result.stdout + result.stderr
    assert result.stdout.count("Excess loss on the probe set") == 1  # the summary from rank zero only
    assert main([*fit_args(tmp_path, "one"), "--run.wandb_mode", "disabled"]) == 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # the second process made no folder
    assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1
    assert len(list(tmp_path.rglob("timeline.h5"))) == 2
    two, one = (
        load_timeline(tmp_path / "two" / "timeline.h5"),
        load_timeline(tmp_path / "one" / "timeline.h5"),
    )
    assert list(one.steps("every_step")) == list(range(STEPS + 1))  # the final weights included
    for group, tolerance in (("every_step", 1e-4), ("probe", 1e-4), ("diagnostics", 1e-3)):
        np.testing.assert_array_equal(two.groups[group].steps, one.groups[group].steps)
        np.testing.assert_allclose(
            two.groups[group].values, one.groups[group].values, rtol=tolerance, atol=tolerance, err_msg=group
        )
    # the training losses are the global batch's: they moved with training and agree per primitive
    loss = one.values("train/loss")
    assert loss[-2].mean() < loss[0].mean()  # the last row (final weights) has no batch
    np.testing.assert_allclose(
        two.values("train_loss/bigram"), one.values("train_loss/bigram"), rtol=1e-4, atol=1e-5
    )
