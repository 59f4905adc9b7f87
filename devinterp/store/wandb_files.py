"""Read back what W&B wrote to disk (``<run folder>/wandb/*/run-<id>.wandb``) with W&B's own
reader, ``wandb leet inspect --json`` (wandb >= 0.31): one JSON record per line.

A resumed run needs the last step that earlier segments of the run really hold: a killed
process's W&B writer loses what it had not yet written (the reader stops at the end of an
incomplete file and says so), and the resumed segment fills that gap from the timeline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ANALYSIS_JOB = "llc"  # the job type of segments that hold estimates made after training (devinterp llc)


class WandbReadError(RuntimeError):
    """W&B's reader could not read a run file."""


def records(path: Path) -> list[dict]:
    """Every record of one ``.wandb`` file, as W&B's reader prints them (``type`` names the kind)."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise WandbReadError(f"{path}: W&B's reader (wandb leet inspect) failed: {last}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def history(path: Path) -> list[dict]:
    """Every history row: {key: value} with ``trainer/global_step`` and W&B's ``_step`` among them."""
    return [r["history"]["item"] for r in records(path) if r.get("type") == "history"]


def run_group(path: Path) -> str | None:
    return next((r["run"].get("run_group") for r in records(path) if r.get("type") == "run"), None)


def run_files(wandb_dir: Path) -> list[Path]:
    """The run files under ``wandb_dir``, oldest first (not through W&B's ``latest-run`` link)."""
    files = [p for p in Path(wandb_dir).glob("*/run-*.wandb") if not p.parent.is_symlink()]
    return sorted(files, key=lambda p: p.stat().st_mtime)


def last_logged_step(wandb_dir: Path) -> int | None:
    """The highest ``trainer/global_step`` in the training segments' W&B files under ``wandb_dir``
    (None: no such files); -1 when they hold no history row. Analysis segments (job type
    ``ANALYSIS_JOB``: LLC curves sent after training) say nothing of the training rows."""
    training = []
    for path in run_files(wandb_dir):
        found = records(path)
        if not any(r.get("type") == "run" and r["run"].get("job_type") == ANALYSIS_JOB for r in found):
            training.append(found)
    if not training:
        return None
    rows = [r["history"]["item"] for found in training for r in found if r.get("type") == "history"]
    steps = [
        int(row["trainer/global_step"])
        for row in rows
        if isinstance(row.get("trainer/global_step"), (int, float))
    ]
    return max(steps, default=-1)
