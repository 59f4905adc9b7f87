from devinterp.threads import available_cores, use_threads  # first: OpenMP's wait policy, before torch

import copy
import os
from pathlib import Path

import pytest
import yaml

# pytest-xdist workers (`make test` runs `pytest -n auto --dist loadfile`: a file's tests on one
# worker, so a module's fixtures are built once): one per core, each computing with its share of
# the cores, so the workers together never ask for more threads than there are cores
MAX_WORKERS = 8  # past this, the longest tests (about a minute each) bound the run, not the count
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    use_threads(max(1, available_cores() // WORKERS))


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: the cores this process may use (its affinity and cgroup quota), at most
    ``MAX_WORKERS``, not xdist's count of the machine's cores."""
    return min(available_cores(), MAX_WORKERS)


os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
SEED_SPEC_PATH = ROOT / "configs" / "languages" / "seed.yaml"

# A small language where every rule mixes (p < 1), windows are short and triggers collide, so
# short random sequences exercise every branch of the precedence and mixture.
MIXING_SPEC = {
    "name": "mixing",
    "categories": {"N": ["x", "y", "z"], "V": {"u": 2.0, "v": 1.0}, "P": ["a", "b"]},
    "start": {"N": 0.5, "P": 0.5},
    "primitives": [
        {"type": "induction", "eligible": ["N", "a"], "p": 0.6},
        {
            "type": "skip_trigram",
            "max_skip": 2,
            "p": 0.7,
            "rules": [
                {"anchor": "a", "trigger": "u", "output": "z"},
                {"anchor": "b", "trigger": "u", "output": "y"},
                {"anchor": "x", "trigger": "v", "output": "b"},
            ],
        },
        {"type": "bigram", "p": 0.8, "table": {"x": {"u": 0.5, "v": 0.5}, "u": {"a": 0.9, "x": 0.1}}},
        {
            "type": "category",
            "transitions": {"N": {"V": 1.0}, "V": {"N": 0.5, "P": 0.5}, "P": {"N": 0.3, "P": 0.3, "V": 0.4}},
        },
    ],
}

# Token trigrams mixed above skip-trigrams sharing their triggers, induction above both.
TRIGRAM_SPEC = {
    "name": "trigram",
    "categories": {"N": ["x", "y"], "V": ["u", "v"], "P": ["a", "b"]},
    "start": {"N": 0.5, "P": 0.5},
    "primitives": [
        {"type": "induction", "eligible": ["x"], "p": 0.5},
        {
            "type": "token_trigram",
            "p": 0.7,
            "rules": [
                {"first": "a", "second": "u", "output": "y"},
                {"first": "x", "second": "u", "output": "b"},
                {"first": "a", "second": "v", "output": "a"},
            ],
        },
        {
            "type": "skip_trigram",
            "max_skip": 3,
            "p": 0.8,
            "rules": [{"anchor": "a", "trigger": "u", "output": "x"}],
        },
        {"type": "bigram", "p": 0.6, "table": {"u": {"a": 0.5, "x": 0.5}}},
        {
            "type": "category",
            "transitions": {"N": {"V": 1.0}, "V": {"N": 0.5, "P": 0.5}, "P": {"N": 0.3, "V": 0.7}},
        },
    ],
}

# A cue fixing a token at least 3 positions later, and topic markers switching bigram tables.
RANGE_TOPIC_SPEC = {
    "name": "range_topic",
    "categories": {"N": ["x", "y"], "V": ["u", "v"], "P": ["a", "b"], "M": ["m1", "m2"]},
    "start": {"N": 0.5, "M": 0.5},
    "primitives": [
        {
            "type": "long_range",
            "min_distance": 3,
            "p": 0.7,
            "rules": [
                {"cue": "x", "trigger": "v", "output": "y"},
                {"cue": "m1", "trigger": "v", "output": "b"},
            ],
        },
        {
            "type": "topic",
            "p": 0.8,
            "topics": {
                "m1": {"u": {"a": 1.0}, "x": {"v": 0.5, "u": 0.5}},
                "m2": {"u": {"b": 0.6, "m1": 0.4}},
            },
        },
        {"type": "bigram", "p": 0.5, "table": {"u": {"x": 1.0}}},
        {
            "type": "category",
            "transitions": {
                "N": {"V": 1.0},
                "V": {"N": 0.4, "P": 0.4, "M": 0.2},
                "P": {"N": 0.5, "V": 0.5},
                "M": {"V": 0.6, "N": 0.4},
            },
        },
    ],
}

# Quotes opened by a bigram row, with their own table, switching skip-trigrams off inside.
QUOTE_SPEC = {
    "name": "quoting",
    "categories": {"N": ["x", "y"], "V": ["u", "v", "said"], "Q": ["<<", ">>"]},
    "start": {"N": 1.0},
    "primitives": [
        {
            "type": "quote",
            "open": "<<",
            "close": ">>",
            "p_close": 0.3,
            "p": 0.9,
            "suppresses": ["skip_trigram"],
            "content": {"u": 0.5, "x": 0.5},
            "table": {"x": {"v": 1.0}},
        },
        {
            "type": "skip_trigram",
            "max_skip": 4,
            "p": 0.8,
            "rules": [{"anchor": "x", "trigger": "u", "output": "said"}],
        },
        {"type": "bigram", "p": 0.7, "table": {"said": {"<<": 1.0}}},
        {"type": "category", "transitions": {"N": {"V": 1.0}, "V": {"N": 0.8, "Q": 0.2}, "Q": {"N": 1.0}}},
    ],
}

# Two bracket types nested up to depth 2, opened by a bigram row, above a skip-trigram.
BRACKET_SPEC = {
    "name": "bracketing",
    "categories": {"N": ["x", "y"], "V": ["u", "v"], "B": ["(", ")", "[", "]"]},
    "start": {"N": 1.0},
    "primitives": [
        {
            "type": "brackets",
            "pairs": [["(", ")"], ["[", "]"]],
            "max_depth": 2,
            "p_open": 0.2,
            "p_close": 0.3,
            "p": 0.9,
            "content": {"u": 0.5, "x": 0.5},
            "table": {"x": {"v": 0.6, "y": 0.4}},
        },
        {
            "type": "skip_trigram",
            "max_skip": 3,
            "p": 0.8,
            "rules": [{"anchor": "x", "trigger": "u", "output": "y"}],
        },
        {"type": "bigram", "p": 0.5, "table": {"v": {"(": 0.5, "[": 0.5}}},
        {"type": "category", "transitions": {"N": {"V": 1.0}, "V": {"N": 1.0}, "B": {"N": 1.0}}},
    ],
}


def seed_spec() -> dict:
    return yaml.safe_load(SEED_SPEC_PATH.read_text())


@pytest.fixture
def mixing_spec() -> dict:
    return copy.deepcopy(MIXING_SPEC)


def fit_quickstart(root: Path, name: str, *overrides: str):
    """configs/quickstart.yaml trained in-process into ``root/name`` (W&B off, the seed language)
    with CLI ``overrides`` after it; returns the run's loaded timeline."""
    from devinterp.cli.main import main
    from devinterp.store.timeline import load_timeline

    argv = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--run.root", str(root)]
    argv += ["--run.name", name, "--run.wandb_mode", "disabled", "--data.language", str(SEED_SPEC_PATH)]
    assert main([*argv, *overrides]) == 0
    return load_timeline(root / name / "timeline.h5")


@pytest.fixture
def tiny_run(tmp_path):
    """Train the tiny run (tests/helpers/tiny.py) in tmp_path: ``tiny_run(max_steps, callbacks,
    trainer_options, **parts)`` returns (trainer, module, data); ``parts`` go to ``tiny_parts``."""
    from tests.helpers.tiny import tiny_parts, tiny_trainer

    def run(max_steps: int, callbacks=(), trainer_options: dict | None = None, **parts):
        data, module = tiny_parts(**parts)
        trainer = tiny_trainer(max_steps, tmp_path, callbacks, **(trainer_options or {}))
        trainer.fit(module, datamodule=data)
        return trainer, module, data

    return run
