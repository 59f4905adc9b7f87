"""``devinterp fit`` / ``validate`` / ``resume``: the LightningCLI with the run folder, resume and
W&B conventions of devinterp/cli/main.py (which imports this module only for these commands, so the
others start without torch and Lightning)."""

from __future__ import annotations

from devinterp.threads import ThreadTuner, available_cores, use_threads

import os
import sys
from pathlib import Path
from typing import Literal, Optional

import torch
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
from devinterp.cli.run_folder import (
    RUN_DIR_VARIABLE,
    check_same_data,
    check_writable,
    plan_run_folder,
)
from devinterp.data import ToyLanguageData
from devinterp.errors import UsageError
from devinterp.module import TensorTransformerModule
from devinterp.store.timeline import TimelineError

# what a user's mistake (or a diverged run) raises here: one line, never a traceback
TRAINING_ERRORS = (
    NonFiniteMetricError,
    TimelineError,
    TimelineWriteError,
    ArgumentError,
    MisconfigurationException,
)


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
        folder = plan_run_folder(config, os.environ)
        self.run_dir, self.child_rank = folder.run_dir, folder.child_rank
        self.resume_step, self.replay_after = folder.resume_step, folder.replay_after
        if folder.resumes:  # from its checkpoint; the folder's config.yaml stays as the run wrote it
            config.ckpt_path = folder.ckpt_path
            self.save_config_callback = None
        if folder.name is not None:
            config.run.name = folder.name  # the saved config.yaml re-runs under the same name
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
