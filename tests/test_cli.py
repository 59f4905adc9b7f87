import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from devinterp.cli.main import main
from tests.conftest import ROOT, SEED_SPEC_PATH

TINY = ROOT / "tests" / "data" / "tiny.yaml"


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "devinterp", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fit_in_a_subprocess_writes_its_run_folder(tmp_path):
    result = run_cli(
        "fit",
        "--config",
        TINY,
        "--run.root",
        tmp_path,
        "--run.wandb_mode",
        "offline",
        "--data.language",
        SEED_SPEC_PATH,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "tiny"
    assert f"run folder: {run}" in result.stdout
    assert "Excess loss on the probe set" in result.stdout and "skip_trigram" in result.stdout
    config = yaml.safe_load((run / "config.yaml").read_text())
    # linked options (data.n_members, model.n_ctx, ...) are left out so the file loads again
    assert config["model"]["n_members"] == 2 and config["data"]["seq_len"] == 16
    assert "n_members" not in config["data"] and "n_ctx" not in config["model"]
    assert config["run"]["name"] == "tiny"  # re-running the saved config keeps the run's name
    assert list((run / "checkpoints").glob("*.ckpt"))
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    summary = json.loads((run / "probe_summary.json").read_text())
    assert summary["first_step"] == 0 and summary["last_step"] == 6
    assert set(summary["primitives"]) == {"induction", "skip_trigram", "bigram", "category"}

    # a second run of the same name never touches the first
    before = sorted(p.name for p in run.rglob("*"))
    again = run_cli(
        "fit",
        "--config",
        TINY,
        "--run.root",
        tmp_path,
        "--run.wandb_mode",
        "disabled",
        "--data.language",
        SEED_SPEC_PATH,
        "--trainer.max_steps",
        "2",
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"run folder: {tmp_path / 'tiny-2'}" in again.stdout
    assert sorted(p.name for p in run.rglob("*")) == before
    assert json.loads((tmp_path / "tiny-2" / "probe_summary.json").read_text())["last_step"] == 2


def test_command_line_overrides_and_print_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "--config",
                str(TINY),
                "--model.n_layers",
                "1",
                "--model.attention",
                "softmax",
                "--print_config",
            ]
        )
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["n_layers"] == 1 and printed["model"]["attention"] == "softmax"
    assert printed["run"]["wandb_mode"] == "offline"


@pytest.mark.parametrize(
    "override,message",
    [
        (["--data.language", "missing.yaml"], "missing.yaml: cannot read language spec"),
        (["--data.seq_len", "8"], "max_skip: 8 must be below the sequence length 8"),
    ],
)
def test_bad_language_gives_one_line_error_and_no_run_folder(tmp_path, capsys, override, message):
    code = main(
        [
            "fit",
            "--config",
            str(TINY),
            "--run.root",
            str(tmp_path),
            "--run.wandb_mode",
            "disabled",
            "--data.language",
            str(SEED_SPEC_PATH),
            *override,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("devinterp: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_language_show_prints_rules_shares_and_bayes_loss(capsys):
    assert main(["language", "show", str(SEED_SPEC_PATH), "--n", "2", "--n-stats", "300"]) == 0
    out = capsys.readouterr().out
    assert "priority: induction > skip_trigram > bigram > category" in out
    assert out.count("sequence ") == 2
    out, baselines = out.split("baselines over")
    names = ("induction", "skip_trigram", "bigram", "category")
    table = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.split()[:1] in [[n] for n in names]
    }
    # the baselines table: uniform, knock-out and blind KL, blind / uniform, the pool
    pools = {
        line.split()[0]: line.split()[1:]
        for line in baselines.splitlines()
        if line.split()[:1] in [[n] for n in names]
    }
    assert set(pools) == set(names) and pools["category"][1] == "-"  # the fallback: no knock-out
    for row in pools.values():
        uniform, blind, ratio = float(row[0]), float(row[2]), float(row[3])
        assert 0 <= blind <= uniform + 1e-9 and ratio == pytest.approx(blind / uniform, abs=0.01)
    assert float(pools["skip_trigram"][1]) == pytest.approx(float(pools["skip_trigram"][0]), rel=1e-3)
    assert float(pools["skip_trigram"][2]) < 0.5 * float(pools["skip_trigram"][0])  # the oracles see much
    assert "UNMEASURABLE" not in baselines  # every primitive of the seed language is measurable
    shares = {k: float(v[0].rstrip("%")) for k, v in table.items()}
    assert set(shares) == {"induction", "skip_trigram", "bigram", "category"}
    assert sum(shares.values()) == pytest.approx(100, abs=0.5)
    assert float(table["skip_trigram"][1]) == pytest.approx(0.0, abs=1e-9)  # deterministic at p = 1
    assert float(table["bigram"][1]) > 0.5


@pytest.mark.parametrize("name", ["quickstart", "reference", "mlp"])
def test_shipped_configs_train(tmp_path, name):
    code = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / f"{name}.yaml"),
            "--run.root",
            str(tmp_path),
            "--run.wandb_mode",
            "disabled",
            "--data.language",
            str(SEED_SPEC_PATH),
            "--trainer.max_steps",
            "2",
            "--data.batch_size",
            "2",
            "--data.probe_size",
            "4",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.accelerator",
            "cpu",
        ]
    )
    assert code == 0
    saved = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
    shipped = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    assert saved["model"]["mlp"] == shipped["model"]["mlp"]
    assert saved["data"]["seq_len"] == shipped["data"]["seq_len"]
    assert json.loads((tmp_path / name / "probe_summary.json").read_text())["last_step"] == 2


def test_dependence_command_trains_variants_that_analyze_reads(tmp_path):
    mechanisms = tmp_path / "mechanisms.yaml"
    mechanisms.write_text(
        "no-prev:\n  - {kind: penalty, metric: 'mechanism/L0H*/prev_token_output', weight: 5.0, to_step: 3}\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "devinterp",
            "dependence",
            "--config",
            str(TINY),
            "--primitives",
            "bigram",
            "--knockin-steps",
            "3",
            "--mechanisms",
            str(mechanisms),
            "--name",
            "dep",
            "--root",
            str(tmp_path),
            "--",
            "--run.wandb_mode",
            "disabled",
            "--data.language",
            str(SEED_SPEC_PATH),
            "--trainer.max_steps",
            "6",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "dep").iterdir())
    assert runs == ["full", "knockin-bigram", "knockout-bigram", "mechanism-no-prev"]
    penalised = yaml.safe_load((tmp_path / "dep" / "mechanism-no-prev" / "config.yaml").read_text())
    assert penalised["mechanism"]["interventions"][0]["to_step"] == 3
    knocked = yaml.safe_load((tmp_path / "dep" / "knockout-bigram" / "config.yaml").read_text())
    assert knocked["data"]["knockout"] == ["bigram"]
    out = tmp_path / "analysis"
    # on the knock-out yardstick: at seq_len 16 the seed language's induction is borderline
    # unmeasurable on the blind one (blind / uniform 0.21 against the 0.2 limit)
    assert main(["analyze", str(tmp_path / "dep"), "--out", str(out), "--yardstick", "knock_out"]) == 0
    report = (out / "report.md").read_text()
    assert "## Onsets" in report and "## Ordering" in report and "## Dependence" in report
    assert "| induction | bigram |" in report  # Y = induction, X = bigram
    assert "![variants](variants.png)" in report and (out / "variants.png").is_file()
    assert "## Mechanism suppression" in report and "| induction | no-prev |" in report
    assert "- no-prev: copy preference at step 6" in report and (out / "mechanism.png").is_file()
    ordering = json.loads((out / "ordering.json").read_text())
    assert ordering["units"] == 2 and {d["x"] for d in ordering["dependence"]} == {"bigram"}
    for png in ("progress.png", "weight_vs_probe.png"):
        assert (out / png).stat().st_size > 5000
    # 2 units order nothing: no DAG figure, whose stacked nodes would read as an order
    assert "Ordering DAG: no significant edge, so no figure." in report
    assert not (out / "ordering_dag.png").exists()
    assert list(out.glob("direct_path_step*.png")) and list(out.glob("qk_skip_trigram_step*.png"))


def test_analyze_refuses_folders_without_timelines(tmp_path, capsys):
    assert main(["analyze", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no timeline.h5 here or in its run folders" in err[0]


@pytest.mark.parametrize(
    "language", sorted((ROOT / "configs" / "languages").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_shipped_language_trains_and_writes_its_curves(tmp_path, language):
    from analysis import load_timeline

    code = main(
        [
            "fit",
            "--config",
            str(TINY),
            "--run.root",
            str(tmp_path),
            "--run.wandb_mode",
            "disabled",
            "--data.language",
            str(language),
            "--trainer.max_steps",
            "2",
            "--data.seq_len",
            "24",
            "--data.probe_min_positions",  # rich.yaml's quotes are rare: grow the probe until seen
            "1",
        ]
    )
    assert code == 0
    timeline = load_timeline(tmp_path / "tiny" / "timeline.h5")
    for primitive in timeline.label_names[1:]:  # a probe curve for every primitive that takes positions
        if primitive in timeline.empty_primitives or (
            primitive == "category" and language.stem.startswith("markov")
        ):
            continue  # a whole-sequence chain leaves its fallback no position
        assert f"probe_excess/{primitive}" in timeline.names(group="probe")
    if language.stem.startswith("markov"):
        assert "strategy_kl/chain/bigram" in timeline.names(group="strategy")
    if language.stem == "long_range":  # probe-measured only: the analysis reports it without weight onsets
        assert main(["analyze", str(tmp_path / "tiny"), "--out", str(tmp_path / "analysis")]) == 0
        assert "| long_range |" in (tmp_path / "analysis" / "report.md").read_text()
        assert "not measured" in (tmp_path / "analysis" / "report.md").read_text()
    if language.stem in ("quote", "brackets"):  # and each head's attention to the open, per span primitive
        heads = timeline.names(f"probe_attn/{language.stem}/*", group="probe")
        assert len(heads) == 2 and np.isfinite(timeline.values(heads[0])).all()
        assert 0 < timeline.info(heads[0]).nothing < 1  # a uniform head's share, the progress baseline


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys; from devinterp.cli.main import main; rc = main(['--help']); "
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'imported'; sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for command in ("fit", "validate", "resume", "language", "analyze", "dependence", "sweep"):
        assert f"\n  {command} " in result.stdout, command
    bare = run_cli()
    assert bare.returncode == 2 and "commands:" in bare.stdout
    for hidden in ("test", "predict"):  # Lightning's, with no step in this model: refused in one line
        refused = run_cli(hidden)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
        assert f"'{hidden}' is not a command" in refused.stderr
    for command in ("resume", "dependence", "sweep"):
        shown = run_cli(command, "--help")
        assert shown.returncode == 0 and "usage: devinterp " + command in shown.stdout, command
    assert "-- <fit options>" in run_cli("dependence", "--help").stdout
    assert "``" not in run_cli("analyze", "--help").stdout


def test_checkpoint_flag_wins_over_the_configs_own_model_checkpoint(tmp_path):
    """The quickstart names its own ModelCheckpoint (every 500 steps): the flag still sets the
    cadence, with a notice, so a quickstart run killed before step 500 has a checkpoint to resume."""
    result = run_cli(
        "fit",
        "--config",
        ROOT / "configs" / "quickstart.yaml",
        "--run.root",
        tmp_path,
        "--run.wandb_mode",
        "disabled",
        "--model.n_members",
        "1",
        "--data.batch_size",
        "8",
        "--data.probe_size",
        "8",
        "--trainer.max_steps",
        "25",
        "--run.checkpoint_every_n_steps",
        "10",
        "--trainer.enable_progress_bar",
        "false",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "notice: checkpoints every 10 steps (run.checkpoint_every_n_steps)" in result.stderr
    checkpoint = torch.load(
        tmp_path / "quickstart" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["global_step"] == 20
