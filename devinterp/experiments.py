"""``devinterp dependence``: train the full language and each knock-out / knock-in variant.

    devinterp dependence --config configs/quickstart.yaml --primitives bigram skip_trigram \\
        [--knockin-steps 200] [--name dependence] [--root runs] [-- extra fit options]

writes runs/<name>/full, runs/<name>/knockout-<X>, runs/<name>/knockin-<X>, one process per run,
all with the config's seeds so members pair up; ``devinterp analyze runs/<name>`` then reports
the verdicts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from devinterp.errors import ArgumentParser, UsageError
from devinterp.language import load_language
from devinterp.language.corpus import is_corpus_path


def variant_arguments(primitives: list[str], knockin_steps: int) -> dict[str, list[str]]:
    """Run name -> the fit options that make that variant."""
    variants = {"full": []}
    for x in primitives:
        variants[f"knockout-{x}"] = ["--data.knockout", f"[{x}]"]
        if knockin_steps > 0:
            variants[f"knockin-{x}"] = [
                "--data.knockin",
                f"[{x}]",
                "--data.knockin_steps",
                str(knockin_steps),
            ]
    return variants


def check_primitives(config: str, extra: list[str], primitives: list[str]) -> None:
    """Fail before any run starts if a primitive is not in the language the runs would train on."""
    try:
        settings = yaml.safe_load(Path(config).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(
            f"{config}: cannot read the run config ({getattr(error, 'strerror', None) or error})"
        ) from None
    language = (settings.get("data") or {}).get("language", "configs/languages/seed.yaml")
    if "--data.language" in extra[:-1]:
        language = extra[extra.index("--data.language") + 1]
    if is_corpus_path(language):
        raise UsageError(f"--data.language: {language} is a corpus: it has no primitives to knock out or in")
    names = load_language(Path(language)).label_names[1:]
    unknown = [p for p in primitives if p not in names]
    if unknown:
        raise UsageError(
            f"--primitives: {unknown[0]!r} is not a primitive of {language} ({', '.join(names)})"
        )


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="devinterp dependence",
        usage="devinterp dependence --config CONFIG --primitives X [X ...] [options] [-- <fit options>]",
        description="Train the full language and each knock-out / knock-in variant, with the same seeds.",
        epilog="Options after -- go to every run's `devinterp fit` (e.g. -- --model.n_members 16 "
        "--trainer.max_steps 1500). Then `devinterp analyze runs/<name>` gives the verdicts.",
    )
    parser.add_argument("--config", required=True, help="run config (YAML), as for devinterp fit")
    parser.add_argument("--primitives", nargs="+", required=True, help="primitives X to knock out and in")
    parser.add_argument(
        "--knockin-steps", type=int, default=200, help="steps on X alone (0: no knock-in runs)"
    )
    parser.add_argument("--name", default="dependence", help="folder under --root holding the runs")
    parser.add_argument("--root", default="runs")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    check_primitives(args.config, extra, args.primitives)
    root = Path(args.root) / args.name
    if root.exists():
        print(
            f"devinterp: error: {root}: exists; a dependence experiment needs a new folder", file=sys.stderr
        )
        return 2
    for name, options in variant_arguments(args.primitives, args.knockin_steps).items():
        command = [
            sys.executable,
            "-m",
            "devinterp",
            "fit",
            "--config",
            args.config,
            "--run.root",
            str(root),
            "--run.name",
            name,
            *options,
            *extra,
        ]
        print(f"[{name}] {' '.join(command[2:])}", flush=True)
        if subprocess.run(command).returncode != 0:
            print(f"devinterp: error: run {name!r} failed; runs so far are in {root}", file=sys.stderr)
            return 1
    print(f"dependence runs in {root}: analyse with `devinterp analyze {root} --out {root}/analysis`")
    return 0
