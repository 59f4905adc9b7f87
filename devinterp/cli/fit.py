"""``devinterp fit`` / ``validate`` / ``resume``: the LightningCLI with the run folder, resume and
W&B conventions of devinterp/cli/main.py (which imports this module only for these commands, so the
others start without torch and Lightning)."""

from __future__ import annotations

from devinterp.threads import ThreadTuner, available_cores, use_threads

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from callbacks.circuit_metrics import CircuitMetrics
from callbacks.mechanism_interventions import MechanismInterventions
from callbacks.probe_metrics import ProbeMetrics
from callbacks.progress_bar import FlushedLossBar
from callbacks.thread_tuning import ThreadTuning
from callbacks.timeline_writer import NonFiniteMetricError, TimelineWriteError, TimelineWriter
from devinterp.data import ToyLanguageData
from devinterp.errors import UsageError
from devinterp.module import TensorTransformerModule
from devinterp.store.timeline import TimelineError, open_timeline
from devinterp.store.wandb_files import WandbReadError, last_logged_step

# what a user's mistake (or a diverged run) raises here: one line, never a traceback
TRAINING_ERRORS = (
    NonFiniteMetricError,
    TimelineError,
    TimelineWriteError,
    ArgumentError,
    MisconfigurationException,
)

RUN_DIR_VARIABLE = "DEVINTERP_RUN_DIR"  # rank zero's run folder, for the DDP processes it launches


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
    if recorded != spec_text and not _same_yaml(recorded, spec_text):  # a comment edited is no change
        raise UsageError(
            f"{timeline}: the run's language or corpus has changed since it started (meta/language_spec "
            "differs from the file the config names); resume with the data it was trained on"
        )


def _same_yaml(a: str, b: str) -> bool:
    try:
        return yaml.safe_load(a) == yaml.safe_load(b)
    except yaml.YAMLError:
        return False


class DevinterpCLI(LightningCLI):
    run_dir: Path | None = None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run.name",
            type=Optional[str],
            default=None,
            help="run folder name (default: the config file's stem)",
        )
        parser.add_argument("--run.root", type=str, default="runs", help="folder holding run folders")
        parser.add_argument(
            "--run.wandb_mode",
            type=Literal["offline", "online", "disabled"],
            default="offline",
            help="W&B mode; offline files sync later with `wandb sync`",
        )
        parser.add_argument("--run.wandb_project", type=str, default="devinterp")
        parser.add_argument(
            "--run.resume",
            type=Optional[str],
            default=None,
            help="continue the run in this folder from its last checkpoint (see `devinterp resume`)",
        )
        parser.add_argument(
            "--run.threads",
            type=int | Literal["auto"],
            default="auto",
            help="compute threads of each training process; auto: the cores this process may use "
            "(its affinity) shared among the node's processes",
        )
        parser.add_argument(
            "--run.checkpoint_every_n_steps",
            type=Optional[int],
            default=None,
            help="checkpoints/last.ckpt cadence (default 500); set, it also overrides the "
            "every_n_train_steps of a ModelCheckpoint the config names",
        )
        # the producers of timeline rows come before the writer (it checks this in setup); the
        # interventions first, so the other callbacks read weights their clamps already hold
        parser.add_lightning_class_args(MechanismInterventions, "mechanism")
        parser.add_lightning_class_args(CircuitMetrics, "circuits")
        parser.add_lightning_class_args(ProbeMetrics, "probe")
        parser.add_lightning_class_args(TimelineWriter, "timeline")
        parser.link_arguments("model.n_members", "data.n_members")
        parser.link_arguments("model.seed", "data.seed")
        parser.link_arguments("data.seq_len", "model.n_ctx")
        parser.link_arguments("data.d_vocab", "model.d_vocab", apply_on="instantiate")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            self.save_config_callback = None  # only a fit owns a run folder
            return
        config = self.config[self.subcommand]
        if config.run.checkpoint_every_n_steps is not None and config.run.checkpoint_every_n_steps < 1:
            raise UsageError(
                f"run.checkpoint_every_n_steps: must be at least 1, got {config.run.checkpoint_every_n_steps}"
            )
        use_threads(compute_threads(config.run.threads, config.trainer))
        self.resume_step = None
        self.replay_after = None  # a finished run: the last step its W&B files hold
        external = launched_rank()  # torchrun, srun or by hand: every process started from outside
        self.child_rank = (
            os.environ.get("LOCAL_RANK", "0") != "0" and RUN_DIR_VARIABLE in os.environ
        ) or bool(external)
        if self.child_rank:  # a DDP process other than rank zero: its run folder, nothing to make
            if RUN_DIR_VARIABLE in os.environ:  # launched by rank zero (Lightning's own launcher)
                self.run_dir = Path(os.environ[RUN_DIR_VARIABLE])
            else:  # started from outside: the folder rank zero uses, which is never renamed then
                self.run_dir = Path(config.run.resume or Path(config.run.root) / run_name(config))
            if config.run.resume:  # as rank zero does (the config callback takes part in a broadcast)
                try:
                    config.ckpt_path = str(last_checkpoint(self.run_dir))
                except UsageError:  # rank zero restarts from step 0
                    config.ckpt_path = None
                self.save_config_callback = None
        elif config.run.resume:
            self.run_dir = Path(config.run.resume)
            if not (self.run_dir / "config.yaml").is_file():
                raise UsageError(f"{self.run_dir}: not a run folder (no config.yaml)")
            try:
                checkpoint = last_checkpoint(self.run_dir)
            except UsageError:  # killed before its first checkpoint: the stream is a pure function
                checkpoint = None  # of the seed, so a restart from step 0 gives the same run
                print(
                    f"{self.run_dir}: no checkpoint yet; restarting the run from step 0 in its folder",
                    flush=True,
                )
            self.resume_step = 0 if checkpoint is None else checkpoint_step(checkpoint)
            if config.trainer.max_steps is not None and self.resume_step >= config.trainer.max_steps:
                self.replay_after = wandb_lacks_steps(self.run_dir, self.resume_step)
                if self.replay_after is None:
                    raise UsageError(
                        f"{self.run_dir}: the run already finished (step {self.resume_step} of "
                        f"trainer.max_steps {config.trainer.max_steps}); "
                        "raise --trainer.max_steps to extend it"
                    )
                print(
                    f"{self.run_dir}: the run already finished (step {self.resume_step}), but its W&B "
                    f"files hold steps only through {self.replay_after} (a writer killed while finishing); "
                    "sending the rest from the timeline, no training",
                    flush=True,
                )
            config.ckpt_path = None if checkpoint is None else str(checkpoint)
            self.save_config_callback = None  # the folder's config.yaml stays as the run wrote it
        else:
            name = run_name(config)
            # started from outside with other processes (they cannot learn a new name): never renamed
            self.run_dir = (
                Path(config.run.root) / name if external == 0 else unique_run_dir(Path(config.run.root), name)
            )
            config.run.name = name  # the saved config.yaml re-runs under the same name (name-2, ...)
        if "weights_only" in config:
            config.weights_only = True  # checkpoints hold tensors and plain values only: no pickle
        config.trainer.default_root_dir = str(self.run_dir)
        callbacks = config.trainer.get("callbacks") or []
        every = config.run.checkpoint_every_n_steps
        own = [c for c in callbacks if "ModelCheckpoint" in str(c.get("class_path", ""))]
        if own and every is not None:  # the flag wins over the config's own cadence, said once
            for callback in own:
                callback.init_args.every_n_train_steps = every
            print(f"notice: checkpoints every {every} steps (run.checkpoint_every_n_steps)", file=sys.stderr)
        elif not own:
            callbacks.append(
                Namespace(
                    class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                    init_args=Namespace(save_last=True, save_top_k=0, every_n_train_steps=every or 500),
                )
            )
            config.trainer.callbacks = callbacks

    def instantiate_trainer(self, **kwargs):
        if self.subcommand == "fit":
            mechanism = self.config_init[self.subcommand].get("mechanism")
            if isinstance(mechanism, MechanismInterventions) and mechanism.interventions:
                mechanism.check(
                    self.datamodule.language,
                    self.model.cfg,
                    self.datamodule.probe.tokens.numpy(),
                    self.config[self.subcommand].trainer.max_steps,
                )
            # made (or checked) only now, after the language, data and model were built without error
            if self.child_rank:
                pass
            elif self.resume_step is None:
                if self.run_dir.exists():  # made by another run since the name was chosen
                    raise UsageError(f"{self.run_dir}: the run folder already exists")
                check_writable(self.run_dir)
            else:
                check_same_data(self.run_dir / "timeline.h5", self.datamodule.spec_text)
                check_writable(self.run_dir / "checkpoints")
            if not self.child_rank:
                os.environ[RUN_DIR_VARIABLE] = str(self.run_dir)  # DDP processes it launches join this run
                print(
                    f"run folder: {self.run_dir}"
                    + (f" (resumed at step {self.resume_step})" if self.resume_step is not None else ""),
                    flush=True,
                )
            run = self.config[self.subcommand].run
            segment = (
                self.run_dir.name if self.resume_step is None else f"{self.run_dir.name}@{self.resume_step}"
            )
            logger = WandbLogger(
                save_dir=str(self.run_dir),
                project=run.wandb_project,
                name=segment,
                group=self.run_dir.name,
                mode=run.wandb_mode,
            )
            # Lightning passes anonymous=None to wandb.init, which W&B answers with "The anonymous
            # setting has no effect": leave the setting out (the run is created later, lazily)
            logger._wandb_init.pop("anonymous", None)
            kwargs.setdefault("logger", logger)
        else:
            kwargs.setdefault("logger", False)
            kwargs.setdefault("limit_val_batches", 1.0)  # the probe set, whatever fit used
        trainer_init = self.config_init[self.subcommand].trainer
        configured = list(trainer_init.get("callbacks") or [])
        if trainer_init.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            kwargs.setdefault("callbacks", configured + [FlushedLossBar()])  # not in config.yaml
        trainer = super().instantiate_trainer(**kwargs)
        tuned = self.subcommand == "fit" and tuned_threads(self.config[self.subcommand])
        if tuned:  # the fastest count, measured while training (devinterp/threads.py)
            trainer.callbacks.insert(0, ThreadTuning(ThreadTuner(tuned)))
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None and self.run_dir:
                callback.dirpath = str(self.run_dir / "checkpoints")
            if (
                isinstance(callback, TimelineWriter) and self.subcommand == "fit"
            ):  # meta/config: every section
                callback.run_config = self._parser(self.subcommand).dump(
                    self.config[self.subcommand], skip_none=False
                )
                callback.resuming = self.resume_step is not None  # a restart from step 0 included
                callback.replay_after = self.replay_after
        return trainer

    def after_fit(self) -> None:
        if not self.child_rank:
            print(f"run folder: {self.run_dir}", flush=True)


def run_name(config) -> str:
    """``run.name``, else the config file's stem, else "run"."""
    if config.run.name:
        return config.run.name
    files = config.get("config") or []
    return Path(str(files[0])).stem if files else "run"


def launched_rank() -> int | None:
    """The global rank an external launcher gave this process, None where none did (one
    process, or Lightning's own launcher, which starts the others from rank zero): torchrun's
    RANK, srun's SLURM_PROCID (more than one task), or by hand NODE_RANK and LOCAL_RANK with
    WORLD_SIZE above 1 (Lightning's numbering: node rank x devices + local rank; only whether it
    is 0 matters here)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "NODE_RANK" in os.environ:
        return int(os.environ["NODE_RANK"]) + int(os.environ.get("LOCAL_RANK", "0"))
    return None


def compute_threads(setting: int | str, trainer_config) -> int:
    """``run.threads`` resolved. ``auto``: the cores this process may use (os.sched_getaffinity,
    so a job scheduler's allocation counts, not the machine's cores, which is what torch's own
    default counts) divided among the training processes on this node (torchrun's
    LOCAL_WORLD_SIZE, or ``trainer.devices`` processes on a CPU)."""
    if setting != "auto":
        if setting < 1:
            raise UsageError(f"run.threads: must be at least 1 or auto, got {setting}")
        return int(setting)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    devices = trainer_config.get("devices")
    if not local and trainer_config.get("accelerator") == "cpu" and isinstance(devices, int):
        local = devices
    return max(1, available_cores() // max(1, local))


def tuned_threads(config) -> int:
    """The cores a ``run.threads auto`` CPU run tunes its thread count over (0: no tuning: a set
    count, an accelerator, or several training processes on this node)."""
    trainer = config.trainer
    if config.run.threads != "auto" or trainer.get("accelerator") not in ("cpu", None, "auto"):
        return 0
    if trainer.get("accelerator") != "cpu" and (
        torch.cuda.is_available() or torch.backends.mps.is_available()
    ):
        return 0
    one_process = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == 1
    if not one_process or trainer.get("devices") not in ("auto", 1, "1", None):
        return 0
    return compute_threads("auto", trainer)


def wandb_lacks_steps(run_dir: Path, last_step: int) -> int | None:
    """The last step a finished run's W&B files hold, where that is before its ``last_step``
    (None: they hold every step, or the run has no W&B files, or they cannot be read)."""
    try:
        persisted = last_logged_step(run_dir / "wandb")
    except (WandbReadError, OSError, ValueError, subprocess.SubprocessError):
        return None
    return persisted if persisted is not None and persisted < last_step else None


def run_lightning(argv: list[str] | None) -> None:
    """Train (or validate) with the LightningCLI; ``argv`` None: the process's command line."""
    DevinterpCLI(
        TensorTransformerModule,
        ToyLanguageData,
        args=argv,
        trainer_defaults={"max_steps": 1000, "log_every_n_steps": 50},
        seed_everything_default=0,
        parser_kwargs={"default_env": False, "exit_on_error": False, "allow_abbrev": False},
    )
