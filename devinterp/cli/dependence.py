"""``devinterp dependence``: train the full language and each knock-out / knock-in / mechanism variant.

    devinterp dependence --config configs/quickstart.yaml --primitives bigram skip_trigram \\
        [--knockin-steps 200] [--mechanisms configs/mechanisms/prev_token.yaml] \\
        [--name dependence] [--root runs] [-- extra fit options]

writes runs/<name>/full, runs/<name>/knockout-<X>, runs/<name>/knockin-<X> and
runs/<name>/mechanism-<V> for every variant V of the mechanisms file (a mapping from variant
name to its list of interventions, devinterp/interventions.py), one process per run, all with the
config's seeds so members pair up; ``devinterp analyze runs/<name>`` then reports the verdicts.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from devinterp.cli.child import run_child
from devinterp.errors import ArgumentParser, UsageError
from devinterp.interventions import parse_interventions
from devinterp.language import load_language
from devinterp.language.corpus import is_corpus_path
from devinterp.language.reachability import emptied_by_knock_out


def load_mechanisms(path: str) -> dict[str, list[dict]]:
    """A mechanisms file: variant name -> list of interventions, each checked as far as it can
    be without the model (names, kinds, fields, steps, weights); one line per mistake."""
    try:
        variants = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(
            f"{path}: cannot read the mechanisms file ({getattr(error, 'strerror', None) or error})"
        )
    if not isinstance(variants, dict) or not variants:
        raise UsageError(f"{path}: expected a mapping from variant name to a list of interventions")
    for name, interventions in variants.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise UsageError(f"{path}: variant name {name!r}: letters, digits, _ . - only")
        if not isinstance(interventions, list) or not interventions:
            raise UsageError(f"{path}: {name}: expected a non-empty list of interventions")
        parse_interventions(interventions, f"{path}: {name}")
    return variants


def variant_arguments(
    primitives: list[str], knockin_steps: int, mechanisms: dict[str, list[dict]] | None = None
) -> dict[str, list[str]]:
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
    for name, interventions in (mechanisms or {}).items():
        variants[f"mechanism-{name}"] = ["--mechanism.interventions", json.dumps(interventions)]
    return variants


def check_primitives(config: str, extra: list[str], primitives: list[str]) -> None:
    """Fail before any run starts if a primitive is not in the language the runs would train on;
    name each primitive a knock-out would leave unable to fire."""
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
    full = load_language(Path(language))
    names = full.label_names[1:]
    unknown = [p for p in primitives if p not in names]
    if unknown:
        raise UsageError(
            f"--primitives: {unknown[0]!r} is not a primitive of {language} ({', '.join(names)})"
        )
    for x in primitives:  # a knock-out that leaves another primitive nothing to fire on, named first
        if x != names[-1]:  # the fallback: its knock-out is refused by the run itself
            for line in emptied_by_knock_out(full, full.knock_out([x]), [x]):
                print(f"notice: {line}", flush=True)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="devinterp dependence",
        usage="devinterp dependence --config CONFIG [--primitives X [X ...]] [--mechanisms FILE] [options] "
        "[-- <fit options>]",
        description="Train the full language and each knock-out / knock-in / mechanism variant, with the "
        "same seeds.",
        epilog="Options after -- go to every run's `devinterp fit` (e.g. -- --model.n_members 16 "
        "--trainer.max_steps 1500). Then `devinterp analyze runs/<name>` gives the verdicts.",
    )
    parser.add_argument("--config", required=True, help="run config (YAML), as for devinterp fit")
    parser.add_argument("--primitives", nargs="+", default=[], help="primitives X to knock out and in")
    parser.add_argument(
        "--mechanisms",
        help="YAML file: variant name -> list of interventions (penalties, clamps); one run each",
    )
    parser.add_argument(
        "--knockin-steps", type=int, default=200, help="steps on X alone (0: no knock-in runs)"
    )
    parser.add_argument("--name", default="dependence", help="folder under --root holding the runs")
    parser.add_argument("--root", default="runs")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if not args.primitives and not args.mechanisms:
        raise UsageError(
            "devinterp dependence: name --primitives to knock out or in, or --mechanisms, or both"
        )
    mechanisms = load_mechanisms(args.mechanisms) if args.mechanisms else None
    if args.primitives:
        check_primitives(args.config, extra, args.primitives)
    root = Path(args.root) / args.name
    if root.exists():
        print(
            f"devinterp: error: {root}: exists; a dependence experiment needs a new folder", file=sys.stderr
        )
        return 2
    for name, options in variant_arguments(args.primitives, args.knockin_steps, mechanisms).items():
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
        code, message = run_child(command)
        if code != 0:
            print(
                f"\ndevinterp: error: run {name!r} failed (exit {code}); runs so far are in {root}; its "
                f"last message:\n  {message}",
                file=sys.stderr,
            )
            return 1
    print(f"dependence runs in {root}: analyse with `devinterp analyze {root} --out {root}/analysis`")
    return 0
