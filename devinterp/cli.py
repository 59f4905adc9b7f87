"""The ``devinterp`` command: LightningCLI for fit/validate, plus ``language``, ``analyze``,
``dependence``, ``sweep`` and ``resume``.

Each ``fit`` writes to ``<run.root>/<run.name>/`` (resolved config.yaml, timeline.h5,
checkpoints/, wandb/, probe_summary.json). The name defaults to the first config file's stem; a
folder that already exists is never reused: the run gets ``name-2``, ``name-3``, ... and the
folder is printed. ``devinterp resume RUN`` continues a stopped run in its own folder from its
last checkpoint (``checkpoints/last.ckpt``, written every ``run.checkpoint_every_n_steps`` steps
unless the config names its own ModelCheckpoint); a finished run is never resumed.
W&B runs offline by default (``--run.wandb_mode online`` to stream, ``disabled`` for none); every
segment of a run (the first, then one per resume) is a W&B run in the group named after the run
folder.

Errors a user can make (a bad argument, config, spec, corpus, folder or file) end the command
with one line ``devinterp: error: ...`` on stderr and a non-zero exit code, before anything in
an existing run folder is touched.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from callbacks.circuit_metrics import CircuitMetrics
from callbacks.probe_metrics import ProbeMetrics
from callbacks.progress_bar import FlushedLossBar
from callbacks.timeline_writer import NonFiniteMetricError, TimelineWriteError, TimelineWriter
from devinterp.data import ToyLanguageData
from devinterp.errors import ArgumentParser, UsageError
from devinterp.language import SpecError
from devinterp.module import TensorTransformerModule

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
    import h5py

    try:
        with h5py.File(timeline, "r", locking=False) as f:
            recorded = f["meta/language_spec"][()].decode()
    except (OSError, KeyError):
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


def map_flush_alias(config: Namespace) -> None:
    """``circuits.flush_every_n_steps`` (before the writer alone flushed) is an alias of
    ``timeline.flush_every_n_steps``: used when the timeline's is left at its default, with a
    one-line notice either way, then cleared so the saved config names one setting."""
    alias = config.circuits.flush_every_n_steps
    if alias is None:
        return
    default = inspect.signature(TimelineWriter).parameters["flush_every_n_steps"].default
    if config.timeline.flush_every_n_steps == default:
        config.timeline.flush_every_n_steps = alias
    print(
        f"notice: circuits.flush_every_n_steps is now timeline.flush_every_n_steps; the run flushes every "
        f"{config.timeline.flush_every_n_steps} steps",
        file=sys.stderr,
    )
    config.circuits.flush_every_n_steps = None


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
            "--run.checkpoint_every_n_steps",
            type=int,
            default=500,
            help="checkpoints/last.ckpt cadence when the config names no ModelCheckpoint",
        )
        # the producers of timeline rows come before the writer (it checks this in setup)
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
        if config.run.checkpoint_every_n_steps < 1:
            raise UsageError(
                f"run.checkpoint_every_n_steps: must be at least 1, got {config.run.checkpoint_every_n_steps}"
            )
        map_flush_alias(config)
        self.resume_step = None
        self.child_rank = os.environ.get("LOCAL_RANK", "0") != "0" and RUN_DIR_VARIABLE in os.environ
        if self.child_rank:  # a DDP process launched by rank zero: its run folder, nothing to make
            self.run_dir = Path(os.environ[RUN_DIR_VARIABLE])
            if config.run.resume:  # as rank zero does (the config callback takes part in a broadcast)
                config.ckpt_path = str(last_checkpoint(self.run_dir))
                self.save_config_callback = None
        elif config.run.resume:
            self.run_dir = Path(config.run.resume)
            if not (self.run_dir / "config.yaml").is_file():
                raise UsageError(f"{self.run_dir}: not a run folder (no config.yaml)")
            checkpoint = last_checkpoint(self.run_dir)
            self.resume_step = checkpoint_step(checkpoint)
            if config.trainer.max_steps is not None and self.resume_step >= config.trainer.max_steps:
                raise UsageError(
                    f"{self.run_dir}: the run already finished (step {self.resume_step} of "
                    f"trainer.max_steps {config.trainer.max_steps}); raise --trainer.max_steps to extend it"
                )
            config.ckpt_path = str(checkpoint)
            self.save_config_callback = None  # the folder's config.yaml stays as the run wrote it
        else:
            name = config.run.name
            if not name:
                files = config.get("config") or []
                name = Path(str(files[0])).stem if files else "run"
            self.run_dir = unique_run_dir(Path(config.run.root), name)
            config.run.name = name  # the saved config.yaml re-runs under the same name (name-2, ...)
        if "weights_only" in config:
            config.weights_only = True  # checkpoints hold tensors and plain values only: no pickle
        config.trainer.default_root_dir = str(self.run_dir)
        callbacks = config.trainer.get("callbacks") or []
        if not any("ModelCheckpoint" in str(c.get("class_path", "")) for c in callbacks):
            callbacks.append(
                Namespace(
                    class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                    init_args=Namespace(
                        save_last=True, save_top_k=0, every_n_train_steps=config.run.checkpoint_every_n_steps
                    ),
                )
            )
            config.trainer.callbacks = callbacks

    def instantiate_trainer(self, **kwargs):
        if self.subcommand == "fit":
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
            kwargs.setdefault(
                "logger",
                WandbLogger(
                    save_dir=str(self.run_dir),
                    project=run.wandb_project,
                    name=segment,
                    group=self.run_dir.name,
                    mode=run.wandb_mode,
                ),
            )
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
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None and self.run_dir:
                callback.dirpath = str(self.run_dir / "checkpoints")
            if (
                isinstance(callback, TimelineWriter) and self.subcommand == "fit"
            ):  # meta/config: every section
                callback.run_config = self._parser(self.subcommand).dump(
                    self.config[self.subcommand], skip_none=False
                )
        return trainer

    def after_fit(self) -> None:
        if not self.child_rank:
            print(f"run folder: {self.run_dir}", flush=True)


def analyze_main(argv: list[str]) -> int:
    """``devinterp analyze RUN [RUN ...] --out DIR``: onsets, ordering, dependence, report."""
    from analysis.report import write_report
    from analysis.timeline import TimelineError

    parser = ArgumentParser(prog="devinterp analyze", description=analyze_main.__doc__)
    parser.add_argument("runs", nargs="+", help="run folders, timeline files, or folders of run folders")
    parser.add_argument("--out", required=True, help="folder for report.md, ordering.json and the PNGs")
    parser.add_argument("--level", type=float, default=0.5, help="onset level (0.5: t50)")
    parser.add_argument(
        "--source", choices=["probe", "weight"], default="probe", help="onsets for the ordering"
    )
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument(
        "--yardstick",
        choices=["fallback", "uniform"],
        default="fallback",
        help="what progress 0 means: the best prediction without the primitive (default), or uniform",
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="*",
        default=None,
        help="steps for the direct-path and QK figures (nearest weight snapshots)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.level < 1:
        parser.error(f"--level: must be between 0 and 1 (0.5 is the t50 onset), got {args.level}")
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha: must be between 0 and 1, got {args.alpha}")
    try:
        report = write_report(
            args.runs, args.out, args.level, args.source, args.alpha, args.steps, args.yardstick
        )
    except (TimelineError, KeyError) as error:
        print(f"devinterp: error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


def resume_argv(argv: list[str]) -> list[str]:
    """``devinterp resume RUN [overrides]`` is ``fit --config RUN/config.yaml --run.resume RUN``."""
    if not argv or argv[0].startswith("-"):
        raise UsageError("resume: name the run folder to resume, e.g. `devinterp resume runs/quickstart`")
    run_dir = Path(argv[0])
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run folder")
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{run_dir}: not a run folder (no config.yaml)")
    return ["fit", "--config", str(run_dir / "config.yaml"), "--run.resume", str(run_dir), *argv[1:]]


def check_config_files(argv: list[str]) -> None:
    """Name the file when a ``--config`` file is missing or not YAML (the parser would not)."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "--config":
            path = Path(value)
            try:
                yaml.safe_load(path.read_text())
            except OSError as error:
                raise UsageError(f"{path}: cannot read the run config ({error.strerror or error})") from None
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f" (line {mark.line + 1})" if mark is not None else ""
                raise UsageError(f"{path}: the run config is not valid YAML{where}") from None


def one_line(error: BaseException) -> str:
    """An error message on one line: argument-parser messages span several."""
    text = " ".join(part.strip() for part in str(error).strip().splitlines() if part.strip())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a KeyError's repr
        text = text[1:-1]
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from analysis.timeline import TimelineError

    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(
        logging.WARNING
    )  # the seed is in config.yaml
    try:
        if argv and argv[0] == "language":
            from devinterp.language_show import main as language_main

            return language_main(argv[1:])
        if argv and argv[0] == "analyze":
            return analyze_main(argv[1:])
        if argv and argv[0] == "sweep":
            from devinterp.sweep import main as sweep_main

            return sweep_main(argv[1:])
        if argv and argv[0] == "dependence":
            from devinterp.experiments import main as dependence_main

            return dependence_main(argv[1:])
        check_config_files(argv)
        if argv and argv[0] == "resume":
            argv = resume_argv(argv[1:])
            if from_command_line:
                sys.argv[1:] = argv
        DevinterpCLI(
            TensorTransformerModule,
            ToyLanguageData,
            args=None if from_command_line else argv,
            trainer_defaults={"max_steps": 1000, "log_every_n_steps": 50},
            seed_everything_default=0,
            parser_kwargs={"default_env": False, "exit_on_error": False, "allow_abbrev": False},
        )
    except (
        NonFiniteMetricError,
        SpecError,
        UsageError,
        TimelineError,
        TimelineWriteError,
        ArgumentError,
        MisconfigurationException,
        ValueError,
        OSError,
    ) as error:
        # ValueError: a config value a class refused in its __init__ (the field is named there);
        # OSError: a full disk or a folder that vanished (the file is named)
        if os.environ.get("DEVINTERP_TRACEBACK"):  # for developers: the full traceback
            raise
        message = one_line(error)
        if isinstance(error, OSError) and error.filename:
            message = f"{error.filename}: {error.strerror or message}"
        print(f"devinterp: error: {message}", file=sys.stderr)
        return 3 if isinstance(error, NonFiniteMetricError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
