"""The run folder of a ``devinterp fit``: which folder, whether it resumes and from what, and the
checks made before any training. Pure policy, apart from reading the folder; the CLI's hook
(devinterp/cli/fit.py) only applies what ``plan_run_folder`` decides.

Conventions: a new run gets ``run.root/run.name`` (``name-2``, ``name-3``, ... when taken; never
renamed when other processes started from outside must find it); ``run.resume FOLDER`` goes on
from its last checkpoint (from step 0 where it has none: the data stream is a pure function of the
seed); a DDP process other than rank zero joins rank zero's folder and makes nothing.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from devinterp.errors import UsageError
from devinterp.store.timeline import TimelineError, open_timeline
from devinterp.store.wandb_files import WandbReadError, last_logged_step

RUN_DIR_VARIABLE = "DEVINTERP_RUN_DIR"  # rank zero's run folder, for the DDP processes it launches


@dataclass
class RunFolder:
    """What ``plan_run_folder`` decided."""

    run_dir: Path
    child_rank: bool  # a DDP process other than rank zero
    resume_step: int | None  # None: a new run; 0: a resume from step 0 (no checkpoint yet)
    replay_after: int | None  # a finished run whose W&B files lack steps after this one
    resumes: bool = False  # start from ckpt_path, and keep the folder's config.yaml as the run wrote it
    ckpt_path: str | None = None  # a resume's checkpoint; None: from step 0
    name: str | None = None  # a new run's name, for the saved config


def plan_run_folder(config, environ: dict[str, str]) -> RunFolder:
    """The run folder for ``config`` (the fit's resolved config: its ``run`` and ``trainer``
    sections) in a process with environment ``environ``."""
    external = launched_rank(environ)  # torchrun, srun or by hand: every process started from outside
    child = (environ.get("LOCAL_RANK", "0") != "0" and RUN_DIR_VARIABLE in environ) or bool(external)
    if child:
        if RUN_DIR_VARIABLE in environ:  # launched by rank zero (Lightning's own launcher)
            run_dir = Path(environ[RUN_DIR_VARIABLE])
        else:  # started from outside: the folder rank zero uses, which is never renamed then
            run_dir = Path(config.run.resume or Path(config.run.root) / run_name(config))
        folder = RunFolder(run_dir, True, None, None)
        if config.run.resume:  # as rank zero does (the config callback takes part in a broadcast)
            folder.resumes = True
            try:
                folder.ckpt_path = str(last_checkpoint(run_dir))
            except UsageError:  # rank zero restarts from step 0
                pass
        return folder
    if config.run.resume:
        return plan_resume(Path(config.run.resume), config.trainer.max_steps)
    name = run_name(config)
    root = Path(config.run.root)
    # started from outside with other processes (they cannot learn a new name): never renamed
    run_dir = root / name if external == 0 else unique_run_dir(root, name)
    return RunFolder(run_dir, False, None, None, name=name)


def plan_resume(run_dir: Path, max_steps: int | None) -> RunFolder:
    """Resume ``run_dir`` from its last checkpoint; a finished run only where its W&B files lack
    steps the timeline holds (they are sent, no training)."""
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{run_dir}: not a run folder (no config.yaml)")
    try:
        checkpoint = last_checkpoint(run_dir)
    except UsageError:  # killed before its first checkpoint: the stream is a pure function
        checkpoint = None  # of the seed, so a restart from step 0 gives the same run
        print(f"{run_dir}: no checkpoint yet; restarting the run from step 0 in its folder", flush=True)
    resume_step = 0 if checkpoint is None else checkpoint_step(checkpoint)
    replay_after = None
    if max_steps is not None and resume_step >= max_steps:
        replay_after = wandb_lacks_steps(run_dir, resume_step)
        if replay_after is None:
            raise UsageError(
                f"{run_dir}: the run already finished (step {resume_step} of trainer.max_steps {max_steps}); "
                "raise --trainer.max_steps to extend it"
            )
        print(
            f"{run_dir}: the run already finished (step {resume_step}), but its W&B files hold steps only "
            f"through {replay_after} (a writer killed while finishing); sending the rest from the "
            "timeline, no training",
            flush=True,
        )
    ckpt_path = None if checkpoint is None else str(checkpoint)
    return RunFolder(run_dir, False, resume_step, replay_after, resumes=True, ckpt_path=ckpt_path)


def unique_run_dir(root: Path, name: str) -> Path:
    """root/name, or root/name-2, name-3, ... if taken: a run folder is never reused."""
    candidate, k = root / name, 1
    while candidate.exists():
        k += 1
        candidate = root / f"{name}-{k}"
    return candidate


def last_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a resume starts from: checkpoints/last.ckpt, else the newest .ckpt."""
    folder = run_dir / "checkpoints"
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not found:
        raise UsageError(f"{run_dir}: no checkpoint in {folder} to resume from")
    return found[-1]


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was taken at (loaded with weights_only: no pickle)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["global_step"])
    except Exception as error:  # a truncated file, another format, a foreign pickle
        raise UsageError(
            f"{path}: not a readable checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ) from None


def check_writable(folder: Path) -> None:
    """Fail now, before any training, if ``folder`` cannot be made or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".devinterp-write-check"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{folder}: cannot write the run folder ({error.strerror or error})") from None


def check_same_data(timeline: Path, spec_text: str) -> None:
    """A resume must train on what the run trained on: the language spec as written (or the
    corpus's description, its sha256 included) must equal the one the timeline recorded."""
    if not timeline.is_file():
        return
    try:
        with open_timeline(timeline) as f:  # a killed writer's SWMR file included
            recorded = f["meta/language_spec"][()].decode()
    except (TimelineError, KeyError):
        return  # a damaged timeline is the writer's to report
    if recorded != spec_text and not same_yaml(recorded, spec_text):  # a comment edited is no change
        raise UsageError(
            f"{timeline}: the run's language or corpus has changed since it started (meta/language_spec "
            "differs from the file the config names); resume with the data it was trained on"
        )


def same_yaml(a: str, b: str) -> bool:
    try:
        return yaml.safe_load(a) == yaml.safe_load(b)
    except yaml.YAMLError:
        return False


def run_name(config) -> str:
    """``run.name``, else the config file's stem, else "run"."""
    if config.run.name:
        return config.run.name
    files = config.get("config") or []
    return Path(str(files[0])).stem if files else "run"


def launched_rank(environ: dict[str, str]) -> int | None:
    """The global rank an external launcher gave this process, None where none did (one
    process, or Lightning's own launcher, which starts the others from rank zero): torchrun's
    RANK, srun's SLURM_PROCID (more than one task), or by hand NODE_RANK and LOCAL_RANK with
    WORLD_SIZE above 1 (Lightning's numbering: node rank x devices + local rank; only whether it
    is 0 matters here)."""
    if "RANK" in environ:
        return int(environ["RANK"])
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
        return int(environ["SLURM_PROCID"])
    if int(environ.get("WORLD_SIZE", "1")) > 1 and "NODE_RANK" in environ:
        return int(environ["NODE_RANK"]) + int(environ.get("LOCAL_RANK", "0"))
    return None


def wandb_lacks_steps(run_dir: Path, last_step: int) -> int | None:
    """The last step a finished run's W&B files hold, where that is before its ``last_step``
    (None: they hold every step, or the run has no W&B files, or they cannot be read)."""
    try:
        persisted = last_logged_step(run_dir / "wandb")
    except (WandbReadError, OSError, ValueError, subprocess.SubprocessError):
        return None
    return persisted if persisted is not None and persisted < last_step else None
