"""Two processes (DDP over gloo on CPU) train what one process trains (issue: Speed and scale).

``data.batch_size`` is the global batch: each process trains on its half of the same stream,
gradients are averaged, and the per-primitive training losses are all-reduced. Only global rank
zero writes the run folder, the timeline and W&B.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from analysis import load_timeline
from devinterp.cli.main import main
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_processes_started_from_outside_train_what_one_process_trains(tmp_path):
    """The multi-node recipe (docs/guides/scaling.md) on one machine: two processes standing in for two nodes
    (MASTER_ADDR 127.0.0.1, NODE_RANK 0 and 1, one device each) started by hand; the torchrun
    line; and two tasks as srun starts them (SLURM's variables). Each makes one run folder,
    written by rank zero alone, equal to one process's run."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "devinterp",
        *fit_args(tmp_path, "nodes"),
        "--trainer.strategy",
        "ddp",
        "--trainer.num_nodes",
        "2",
        "--trainer.devices",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--run.wandb_mode",
        "disabled",
    ]
    env = dict(
        os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2"
    )
    env.pop("DEVINTERP_RUN_DIR", None)
    nodes = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(env, NODE_RANK=str(rank), LOCAL_RANK="0"),
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "Excess loss on the probe set" in outputs[0] and "Excess loss" not in outputs[1]
    # the recipe's torchrun line, on one node with two processes
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2"]
    torchrun += ["--master-port", str(free_port()), "-m", "devinterp", *command[3:]]
    torchrun[torchrun.index("nodes")] = "torchrun"
    torchrun[torchrun.index("--trainer.num_nodes") + 1] = "1"
    torchrun[torchrun.index("--trainer.devices") + 1] = "2"
    result = subprocess.run(torchrun, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # the recipe's srun line as SLURM would start it: two tasks, their ranks in SLURM_PROCID
    slurm = [*command]
    slurm[slurm.index("nodes")] = "slurm"
    slurm[slurm.index("--trainer.num_nodes") + 1] = "1"
    slurm[slurm.index("--trainer.devices") + 1] = "2"
    srun = dict(
        os.environ, OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NODEID="0"
    )
    srun.update(SLURM_JOB_NAME="recipe", SLURM_JOB_ID=str(port % 10000), SLURM_NODELIST="localhost")
    tasks = [
        subprocess.Popen(
            slurm,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(srun, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
        )
        for rank in (0, 1)
    ]
    outputs = [task.communicate(timeout=300)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert main([*fit_args(tmp_path, "one"), "--run.wandb_mode", "disabled"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "nodes",
        "one",
        "slurm",
        "torchrun",
    ]  # no other folder
    one = load_timeline(tmp_path / "one" / "timeline.h5")
    for name in ("nodes", "torchrun", "slurm"):
        run = load_timeline(tmp_path / name / "timeline.h5")
        for group in ("every_step", "probe"):
            np.testing.assert_array_equal(run.groups[group].steps, one.groups[group].steps)
            np.testing.assert_allclose(
                run.groups[group].values, one.groups[group].values, rtol=1e-4, atol=1e-4, err_msg=group
            )
