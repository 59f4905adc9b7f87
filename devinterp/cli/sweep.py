"""``devinterp sweep SWEEP.yaml``: a W&B sweep's grid, run locally one run after another.

The file is a W&B sweep config (``configs/sweeps/``): ``method: grid``, ``parameters`` with
``values`` lists keyed by fit options (``model.seed``, ``data.knockout``), and a ``command``
whose part between ``fit`` and ``${args}`` gives the base options. With a W&B server the same
file drives ``wandb sweep`` / ``wandb agent`` across machines; without one this command trains
every grid point as ``<root>/<sweep name>/<point>/`` (W&B offline), so ``devinterp analyze
<root>/<sweep name>`` pools them. A point whose run finished is skipped; one that stopped is
resumed, so an interrupted sweep continues where it was.

    devinterp sweep configs/sweeps/seeds.yaml [--root runs] [--dry-run] [-- extra fit options]
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import yaml

from devinterp.cli.child import run_child
from devinterp.errors import ArgumentParser, UsageError


def read_sweep(path: Path) -> dict:
    try:
        sweep = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UsageError(f"{path}: cannot read the sweep ({error.strerror or error})") from None
    except yaml.YAMLError:
        raise UsageError(f"{path}: the sweep is not valid YAML") from None
    if not isinstance(sweep, dict):
        raise UsageError(f"{path}: expected a W&B sweep mapping with method, parameters and command")
    if sweep.get("method", "grid") != "grid":
        raise UsageError(
            f"{path}: method: a local sweep runs grids only, got {sweep.get('method')!r} "
            "(use wandb agent for random and bayes)"
        )
    parameters = sweep.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise UsageError(f"{path}: parameters: expected a mapping of fit options to {{values: [...]}}")
    for key, spec in parameters.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("values"), list) or not spec["values"]:
            raise UsageError(f"{path}: parameters.{key}: expected {{values: [...]}} with at least one value")
    command = sweep.get("command", [])
    if not isinstance(command, list) or "fit" not in command:
        raise UsageError(
            f"{path}: command: expected the W&B command list, with `devinterp fit ...` and ${{args}}"
        )
    return sweep


def base_arguments(command: list) -> list[str]:
    """The options between ``fit`` and ``${args}``, W&B's mode left to the local runner."""
    base = [str(c) for c in command[command.index("fit") + 1 :] if str(c) != "${args}"]
    if "--run.wandb_mode" in base:
        i = base.index("--run.wandb_mode")
        del base[i : i + 2]
    return base


def point_name(point: dict) -> str:
    """A folder name for a grid point, e.g. ``seed-4_knockout-bigram``."""
    parts = []
    for key, value in point.items():
        shown = (
            "none"
            if value in ([], None)
            else "+".join(map(str, value))
            if isinstance(value, list)
            else str(value)
        )
        parts.append(f"{key.split('.')[-1]}-{shown}")
    return re.sub(r"[^A-Za-z0-9_.+=-]", "", "_".join(parts))


def grid(parameters: dict) -> list[dict]:
    keys = list(parameters)
    return [dict(zip(keys, values)) for values in itertools.product(*(parameters[k]["values"] for k in keys))]


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="devinterp sweep",
        usage="devinterp sweep SWEEP.yaml [--root ROOT] [--dry-run] [-- <fit options>]",
        description="Train a W&B sweep's grid locally, one run folder per point (W&B offline).",
        epilog="Options after -- go to every point's `devinterp fit` (e.g. -- --trainer.max_steps 600). "
        "Then `devinterp analyze <root>/<sweep name>` pools the points.",
    )
    parser.add_argument("sweep", help="W&B sweep config (YAML), method grid")
    parser.add_argument("--root", default="runs", help="the runs go to <root>/<sweep name>/")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    path = Path(args.sweep)
    sweep = read_sweep(path)
    folder = Path(args.root) / str(sweep.get("name") or path.stem)
    base = base_arguments(sweep["command"])
    points = grid(sweep["parameters"])
    print(f"sweep {path}: {len(points)} runs in {folder}", flush=True)
    for i, point in enumerate(points, 1):
        name = point_name(point)
        run = folder / name
        if (run / "probe_summary.json").is_file():
            print(f"[{i}/{len(points)}] {name}: finished, skipped", flush=True)
            continue
        options = [
            item
            for key, value in point.items()
            for item in (
                f"--{key}",
                yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n..."),
            )
        ]
        if (run / "config.yaml").is_file():
            command = [
                sys.executable,
                "-m",
                "devinterp",
                "resume",
                str(run),
                "--run.wandb_mode",
                "offline",
                *extra,
            ]
        else:
            command = [
                sys.executable,
                "-m",
                "devinterp",
                "fit",
                *base,
                *options,
                "--run.root",
                str(folder),
                "--run.name",
                name,
                "--run.wandb_mode",
                "offline",
                *extra,
            ]
        print(f"[{i}/{len(points)}] {name}: {' '.join(command[2:])}", flush=True)
        if args.dry_run:
            continue
        code, message = run_child(command)
        if code != 0:
            print(f"\nsweep run {name!r}: {message}", file=sys.stderr)
            raise UsageError(f"sweep run {name!r} failed; the sweep continues from it when run again")
    if not args.dry_run:
        print(f"sweep runs in {folder}: analyse with `devinterp analyze {folder} --out {folder}/analysis`")
    return 0
