"""The ``devinterp`` command: LightningCLI for fit/validate, plus ``language show``.

Each ``fit`` writes to ``<run.root>/<run.name>/`` (resolved config.yaml, timeline.h5,
checkpoints/, wandb/, probe_summary.json). The name defaults to the first config file's stem; a folder that already
exists is never reused: the run gets ``name-2``, ``name-3``, ... and the folder is printed.
W&B runs offline by default (``--run.wandb_mode online`` to stream, ``disabled`` for none).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal, Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from callbacks.circuit_metrics import CircuitMetrics
from callbacks.probe_metrics import ProbeMetrics
from callbacks.timeline_writer import NonFiniteMetricError, TimelineWriter
from devinterp.data import ToyLanguageData
from devinterp.language import SpecError
from devinterp.module import TensorTransformerModule


def unique_run_dir(root: Path, name: str) -> Path:
    """root/name, or root/name-2, name-3, ... if taken: a run folder is never reused."""
    candidate, k = root / name, 1
    while candidate.exists():
        k += 1
        candidate = root / f"{name}-{k}"
    return candidate


class DevinterpCLI(LightningCLI):
    run_dir: Path | None = None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run.name", type=Optional[str], default=None,
                            help="run folder name (default: the config file's stem)")
        parser.add_argument("--run.root", type=str, default="runs", help="folder holding run folders")
        parser.add_argument("--run.wandb_mode", type=Literal["offline", "online", "disabled"],
                            default="offline", help="W&B mode; offline files sync later with `wandb sync`")
        parser.add_argument("--run.wandb_project", type=str, default="devinterp")
        # order matters at a step's end: weight rows are buffered before a probe can stop the
        # run, and the writer (last) closes only after the others handed over their rows
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
        name = config.run.name
        if not name:
            files = config.get("config") or []
            name = Path(str(files[0])).stem if files else "run"
        self.run_dir = unique_run_dir(Path(config.run.root), name)
        config.run.name = name  # the saved config.yaml re-runs under the same name (name-2, ...)
        config.trainer.default_root_dir = str(self.run_dir)

    def instantiate_trainer(self, **kwargs):
        if self.subcommand == "fit":
            # made only now, after the language, data and model were built without error
            self.run_dir.mkdir(parents=True)
            print(f"run folder: {self.run_dir}", flush=True)
            run = self.config[self.subcommand].run
            kwargs.setdefault("logger", WandbLogger(
                save_dir=str(self.run_dir), project=run.wandb_project, name=self.run_dir.name,
                mode=run.wandb_mode))
        else:
            kwargs.setdefault("logger", False)
            kwargs.setdefault("limit_val_batches", 1.0)  # the probe set, whatever fit used
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None and self.run_dir:
                callback.dirpath = str(self.run_dir / "checkpoints")
        return trainer

    def after_fit(self) -> None:
        print(f"run folder: {self.run_dir}", flush=True)


def analyze_main(argv: list[str]) -> int:
    """``devinterp analyze RUN [RUN ...] --out DIR``: onsets, ordering, dependence, report."""
    import argparse

    from analysis.report import write_report
    from analysis.timeline import TimelineError

    parser = argparse.ArgumentParser(prog="devinterp analyze", description=analyze_main.__doc__)
    parser.add_argument("runs", nargs="+", help="run folders, timeline files, or folders of run folders")
    parser.add_argument("--out", required=True, help="folder for report.md, ordering.json and the PNGs")
    parser.add_argument("--level", type=float, default=0.5, help="onset level (0.5: t50)")
    parser.add_argument("--source", choices=["probe", "weight"], default="probe", help="onsets for the ordering")
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--steps", type=int, nargs="*", default=None,
                        help="steps for the direct-path and QK figures (nearest weight snapshots)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.runs, args.out, args.level, args.source, args.alpha, args.steps)
    except (TimelineError, KeyError) as error:
        print(f"devinterp: error: {str(error).strip(chr(39))}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        if argv and argv[0] == "language":
            from devinterp.language_show import main as language_main

            return language_main(argv[1:])
        if argv and argv[0] == "analyze":
            return analyze_main(argv[1:])
        if argv and argv[0] == "dependence":
            from devinterp.experiments import main as dependence_main

            return dependence_main(argv[1:])
        DevinterpCLI(
            TensorTransformerModule,
            ToyLanguageData,
            args=None if from_command_line else argv,
            trainer_defaults={"max_steps": 1000, "log_every_n_steps": 50},
            parser_kwargs={"default_env": False},
        )
    except SpecError as error:
        print(f"devinterp: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteMetricError as error:
        print(f"devinterp: error: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
