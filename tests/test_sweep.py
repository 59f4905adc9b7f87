"""W&B sweep configs run locally: every grid point a run folder that `devinterp analyze` pools."""

import json

import pytest
import yaml

from devinterp.cli.main import main
from devinterp.cli.sweep import base_arguments, grid, point_name, read_sweep
from tests.conftest import ROOT, SEED_SPEC_PATH

TINY = ROOT / "tests" / "data" / "tiny.yaml"


def test_shipped_sweeps_are_grids_of_fit_options():
    for path in sorted((ROOT / "configs" / "sweeps").glob("*.yaml")):
        sweep = read_sweep(path)
        assert "${args}" in sweep["command"] and "${env}" in sweep["command"]  # as wandb agent runs it
        base = base_arguments(sweep["command"])
        assert base[:2] == ["--config", "configs/quickstart.yaml"] and "--run.wandb_mode" not in base
        names = [point_name(p) for p in grid(sweep["parameters"])]
        assert len(set(names)) == len(names) >= 2


def test_point_names():
    assert point_name({"model.seed": 4, "data.knockout": []}) == "seed-4_knockout-none"
    assert point_name({"data.knockout": ["bigram", "induction"]}) == "knockout-bigram+induction"


def test_local_sweep_trains_every_point_once_and_analyze_pools_them(tmp_path, capsys):
    sweep = {
        "name": "grid",
        "method": "grid",
        "command": [
            "${env}",
            "python",
            "-m",
            "devinterp",
            "fit",
            "--config",
            str(TINY),
            "--run.wandb_mode",
            "online",
            "${args}",
        ],
        "parameters": {"model.seed": {"values": [0, 2]}, "data.knockout": {"values": [[], ["bigram"]]}},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    extra = ["--", "--data.language", str(SEED_SPEC_PATH), "--trainer.max_steps", "6"]
    assert main(["sweep", str(path), "--root", str(tmp_path / "runs"), *extra]) == 0
    runs = tmp_path / "runs" / "grid"
    names = sorted(p.name for p in runs.iterdir())
    assert names == [
        "seed-0_knockout-bigram",
        "seed-0_knockout-none",
        "seed-2_knockout-bigram",
        "seed-2_knockout-none",
    ]
    config = yaml.safe_load((runs / "seed-2_knockout-bigram" / "config.yaml").read_text())
    assert config["model"]["seed"] == 2 and config["data"]["knockout"] == ["bigram"]
    assert config["run"]["wandb_mode"] == "offline"  # a local sweep never tries to reach a server

    capsys.readouterr()
    assert main(["sweep", str(path), "--root", str(tmp_path / "runs"), *extra]) == 0  # again: nothing to do
    assert capsys.readouterr().out.count("finished, skipped") == 4

    out = tmp_path / "analysis"
    # on the knock-out yardstick: at seq_len 16 the seed language's induction is borderline
    # unmeasurable on the blind one (blind / uniform 0.21 against the 0.2 limit), and this checks pooling
    assert main(["analyze", str(runs), "--out", str(out), "--yardstick", "knock_out"]) == 0
    ordering = json.loads((out / "ordering.json").read_text())
    assert ordering["units"] == 4  # 2 full runs x 2 members
    by_y = {d["y"]: d for d in ordering["dependence"]}
    assert by_y["induction"]["x"] == "bigram" and by_y["induction"]["knock_out"]["n_units"] <= 4


@pytest.mark.parametrize(
    "text,message",
    [
        ("method: bayes\nparameters: {model.seed: {values: [1]}}\ncommand: [fit]\n", "runs grids only"),
        (
            "method: grid\nparameters: {model.seed: 3}\ncommand: [fit]\n",
            "parameters.model.seed: expected {values",
        ),
        ("method: grid\nparameters: {model.seed: {values: [1]}}\n", "command: expected the W&B command"),
    ],
)
def test_bad_sweep_files_are_named(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"devinterp: error: {path}") and message in err and len(err.splitlines()) == 1
