"""The ``devinterp`` command: LightningCLI for fit/validate, plus ``language``, ``analyze``,
``dependence``, ``sweep``, ``llc`` and ``resume``.

Each ``fit`` writes to ``<run.root>/<run.name>/`` (resolved config.yaml, timeline.h5,
checkpoints/, wandb/, probe_summary.json). The name defaults to the first config file's stem; a
folder that already exists is never reused: the run gets ``name-2``, ``name-3``, ... and the
folder is printed. ``devinterp resume RUN`` continues a stopped run in its own folder from its
last checkpoint (``checkpoints/last.ckpt``, written every ``run.checkpoint_every_n_steps`` steps
unless the config names its own ModelCheckpoint); a finished run is never trained again: its
resume only sends W&B the rows a writer killed while finishing lost, or is refused.
W&B runs offline by default (``--run.wandb_mode online`` to stream, ``disabled`` for none); every
segment of a run (the first, then one per resume) is a W&B run in the group named after the run
folder.

Errors a user can make (a bad argument, config, spec, corpus, folder or file) end the command
with one line ``devinterp: error: ...`` on stderr and a non-zero exit code, before anything in
an existing run folder is touched.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import yaml

from devinterp.errors import ArgumentParser, UsageError
from devinterp.language import SpecError

COMMANDS = """usage: devinterp COMMAND [ARGS]   (devinterp COMMAND --help for its arguments)

commands:
  fit          train a run: devinterp fit --config configs/quickstart.yaml [--section.field value]
  validate     evaluate a run's model on the validation set (Lightning's validate)
  resume       continue a stopped run in its folder: devinterp resume runs/quickstart
  language     show a language spec: devinterp language show configs/languages/seed.yaml
  analyze      onsets, ordering, dependence and a report: devinterp analyze runs/NAME --out DIR
  dependence   train the full language and knock-out / knock-in variants with the same seeds
  sweep        train a grid of configs, one run folder per point
  llc          local learning coefficients at a run's weight snapshots: devinterp llc runs/NAME
"""
TRAINING_COMMANDS = ("fit", "validate")  # Lightning's test and predict: the model has no such step
ALL_COMMANDS = (*TRAINING_COMMANDS, "resume", "language", "analyze", "dependence", "sweep", "llc")
RESUME_HELP = """usage: devinterp resume RUN_FOLDER [--section.field value ...]

Continue a stopped run in its own folder from checkpoints/last.ckpt (a run killed before its first
checkpoint restarts from step 0). Options override the run's config.yaml, e.g.
--trainer.max_steps 5000 extends a finished run. Without it, a finished run is not trained
again: the resume sends W&B the last rows a writer killed while finishing lost, or is refused.
"""


def analyze_main(argv: list[str]) -> int:
    """``devinterp analyze RUN [RUN ...] --out DIR``: onsets, ordering, dependence, report."""
    parser = ArgumentParser(
        prog="devinterp analyze",
        description="Onsets, ordering, dependence and a report (report.md, ordering.json, PNGs) for "
        "run folders, timeline files, or folders of run folders.",
    )
    parser.add_argument("runs", nargs="+", help="run folders, timeline files, or folders of run folders")
    parser.add_argument("--out", required=True, help="folder for report.md, ordering.json and the PNGs")
    parser.add_argument("--level", type=float, default=0.5, help="onset level (0.5: t50)")
    parser.add_argument(
        "--source", choices=["probe", "weight"], default="probe", help="onsets for the ordering"
    )
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument(
        "--yardstick",
        choices=["blind", "knock_out", "uniform"],
        default="blind",
        help="what progress 0 means: blind (default), the best prediction of a model that cannot read "
        "what the primitive needs (its knock-out, the context-limited oracles it admits and uniform, "
        "pooled); knock_out, the knocked-out language mixed with uniform; or uniform",
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="*",
        default=None,
        help="steps for the direct-path and QK figures (nearest weight snapshots)",
    )
    parser.add_argument("--member", type=int, default=0, help="the member the circuit figures show")
    parser.add_argument(
        "--no-stages",
        action="store_true",
        help="leave out the stages section (latent-state model and essential dynamics)",
    )
    parser.add_argument(
        "--stage-bins", type=int, default=None, help="log-step bins of the latent-state model (default 80)"
    )
    parser.add_argument(
        "--max-states",
        type=int,
        default=None,
        help="the largest state count BIC is offered (default 12); the report says when BIC picks it",
    )
    parser.add_argument(
        "--serve-threshold",
        type=float,
        default=0.2,
        help="share of a rule's attribution mass at which a component serves it (Components section)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.serve_threshold <= 1:
        parser.error(f"--serve-threshold: must be in (0, 1], got {args.serve_threshold}")
    if args.stage_bins is not None and args.stage_bins < 4:
        parser.error(f"--stage-bins: must be at least 4, got {args.stage_bins}")
    if args.max_states is not None and args.max_states < 1:
        parser.error(f"--max-states: must be at least 1, got {args.max_states}")
    if not 0 < args.level < 1:
        parser.error(f"--level: must be between 0 and 1 (0.5 is the t50 onset), got {args.level}")
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha: must be between 0 and 1, got {args.alpha}")
    from devinterp.threads import available_cores, use_threads

    use_threads(available_cores())  # the fits, bootstraps and any model rebuilt from snapshots
    from analysis.report import write_report  # matplotlib: only once the arguments are good
    from devinterp.store.timeline import TimelineError

    try:
        report = write_report(
            args.runs,
            args.out,
            args.level,
            args.source,
            args.alpha,
            args.steps,
            args.yardstick,
            args.member,
            stages=not args.no_stages,
            serve_threshold=args.serve_threshold,
            **{k: v for k, v in [("stage_bins", args.stage_bins), ("max_states", args.max_states)] if v},
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
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(COMMANDS, end="")
        return 0 if argv else 2
    os.environ.setdefault("WANDB_SILENT", "true")
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(
        logging.WARNING
    )  # the seed is in config.yaml
    try:
        if argv[0] == "language":
            from devinterp.cli.language import main as language_main

            return language_main(argv[1:])
        if argv[0] == "analyze":
            return analyze_main(argv[1:])
        if argv[0] == "sweep":
            from devinterp.cli.sweep import main as sweep_main

            return sweep_main(argv[1:])
        if argv[0] == "llc":
            from devinterp.cli.llc import main as llc_main

            return llc_main(argv[1:])
        if argv[0] == "dependence":
            from devinterp.cli.dependence import main as dependence_main

            return dependence_main(argv[1:])
        if argv[0] not in ALL_COMMANDS and not argv[0].startswith("-"):
            raise UsageError(
                f"{argv[0]!r} is not a command; one of: {', '.join(ALL_COMMANDS)} (devinterp --help)"
            )
        if argv[0] == "resume" and (len(argv) < 2 or argv[1] in ("-h", "--help")):
            print(RESUME_HELP, end="")
            return 0 if len(argv) > 1 else 2
        check_config_files(argv)
        if argv[0] == "resume":
            argv = resume_argv(argv[1:])
            if from_command_line:
                sys.argv[1:] = argv
        from devinterp.cli.fit import run_lightning
        from devinterp.cli.quiet import quiet_known_noise

        quiet_known_noise()
        run_lightning(None if from_command_line else argv)
    except Exception as error:
        if not isinstance(error, user_errors()):
            raise
        # ValueError: a config value a class refused in its __init__ (the field is named there);
        # OSError: a full disk or a folder that vanished (the file is named)
        if os.environ.get("DEVINTERP_TRACEBACK"):  # for developers: the full traceback
            raise
        message = one_line(error)
        if isinstance(error, OSError) and error.filename:
            message = f"{error.filename}: {error.strerror or message}"
        print(f"devinterp: error: {message}", file=sys.stderr)
        return 3 if diverged(error) else 2
    return 0


def diverged(error: BaseException) -> bool:
    if "callbacks.timeline_writer" not in sys.modules:
        return False
    from callbacks.timeline_writer import NonFiniteMetricError

    return isinstance(error, NonFiniteMetricError)


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that end a command with one line: the light ones, and the training command's
    when it was imported (importing it here would cost every command torch and Lightning)."""
    kinds: tuple[type[BaseException], ...] = (SpecError, UsageError, ValueError, OSError)
    if "devinterp.cli.fit" in sys.modules:
        from devinterp.cli.fit import TRAINING_ERRORS

        kinds += TRAINING_ERRORS
    return kinds


if __name__ == "__main__":
    sys.exit(main())
