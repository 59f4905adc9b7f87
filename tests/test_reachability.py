"""Which rules can ever fire (devinterp/language/reachability.py), checked against sampling, and
an emptied primitive carried through training and analysis without a false divergence."""

import copy
import json

import numpy as np
import pytest

from devinterp.language import load_language, parse_language
from devinterp.language.reachability import emptied_by_knock_out, empty_text, reachability
from tests.conftest import ROOT, seed_spec

LANGUAGES = sorted((ROOT / "configs" / "languages").glob("*.yaml"))
BRACKETS = ROOT / "configs" / "languages" / "brackets.yaml"
TINY = ROOT / "tests" / "data" / "tiny.yaml"


def sampled_labels(language, n=600, seq_len=48) -> np.ndarray:
    """(labels,) how many predicted positions each primitive labels in a sample."""
    sample = language.sample(n, seq_len, seed=3)
    return np.bincount(sample.labels[:, 1:].ravel(), minlength=len(language.label_names))[1:]


@pytest.mark.parametrize("path", LANGUAGES, ids=lambda p: p.stem)
def test_every_shipped_language_can_fire_every_rule(path):
    found = reachability(load_language(path))
    assert found.tokens.all() and found.rules.all() and found.empty == {}


@pytest.mark.parametrize(
    "name, emptied",
    [("brackets", {"brackets": "'(' or '['"}), ("quote", {"quote": "'<<'"}), ("rich", {"quote", "brackets"})],
)
def test_knocking_out_the_only_opener_empties_the_span_and_sampling_agrees(name, emptied):
    full = load_language(ROOT / "configs" / "languages" / f"{name}.yaml")
    knocked = full.knock_out(["bigram"])
    empty = reachability(knocked).empty
    assert (empty == emptied) if isinstance(emptied, dict) else (set(empty) == emptied)
    # the independent check: a sample of the knocked-out language never labels an empty
    # primitive, and labels every other one (the fixpoint over-approximates, never misses)
    counts = dict(zip(knocked.label_names[1:], sampled_labels(knocked)))
    assert all(counts[p] == 0 for p in empty) and all(c > 0 for p, c in counts.items() if p not in empty)
    lines = emptied_by_knock_out(full, knocked, ["bigram"])
    assert len(lines) == len(empty) and all("left out of this variant's analysis" in line for line in lines)


def test_a_rule_whose_trigger_nothing_produces_is_empty_from_the_spec():
    spec = seed_spec()
    spec["categories"]["GHOST"] = ["ghost"]  # no category transition leads here
    spec["primitives"][-1]["transitions"]["GHOST"] = {"NAME": 1.0}
    spec["primitives"].insert(0, {"type": "bigram", "name": "haunt", "table": {"ghost": {"alice": 1.0}}})
    language = parse_language(copy.deepcopy(spec), "ghost.yaml")
    found = reachability(language)
    assert found.empty == {"haunt": "'ghost'"}
    assert not found.tokens[language.vocab.tokens.index("ghost")]
    assert empty_text(language) == [
        "haunt can never fire: its condition needs 'ghost', which no rule of ghost.yaml produces"
    ]
    assert dict(zip(language.label_names[1:], sampled_labels(language)))["haunt"] == 0


def test_the_probe_does_not_grow_for_positions_that_cannot_occur(capsys):
    from devinterp.data import ToyLanguageData

    knocked = ToyLanguageData(
        str(BRACKETS), seq_len=24, probe_size=8, probe_min_positions=64, knockout=["bigram"]
    )
    assert knocked.probe.tokens.shape[0] == 8  # nothing short among the primitives that can fire
    err = capsys.readouterr().err
    assert "leaves nothing that produces '(' or '['" in err and "probe positions in" not in err
    full = ToyLanguageData(str(BRACKETS), seq_len=24, probe_size=8, probe_min_positions=64)
    assert full.probe.tokens.shape[0] > 8  # brackets can occur: the probe grows to find them


def test_weight_metrics_leave_out_what_cannot_fire():
    from devinterp.metrics.weights import Diagnostics, HeadlineMetrics
    from devinterp.model import ModelConfig

    knocked = load_language(ROOT / "configs" / "languages" / "rich.yaml").knock_out(["bigram"])
    headline = HeadlineMetrics(knocked, 32)
    primitives = {i.primitive for i in headline.infos}
    assert {"quote", "brackets"}.isdisjoint(primitives) and "skip_trigram" in primitives
    cfg = ModelConfig(d_vocab=knocked.d_vocab, n_ctx=32, n_layers=2, n_heads=2, d_model=16, d_head=8)
    assert {i.primitive for i in Diagnostics(knocked, cfg).infos} >= {"skip_trigram"}


def test_an_emptied_primitive_trains_analyses_and_reports_untestable(tmp_path, capsys):
    """The researcher's case: knocking out bigram leaves brackets no opener. The variant trains
    (no probe growth, no NaN read as divergence, exit 0) and the report calls the dependence of
    brackets on bigram untestable instead of "no evidence"."""
    from analysis import load_timeline
    from devinterp.cli.main import main

    base = ["fit", "--config", str(TINY), "--run.root", str(tmp_path), "--run.wandb_mode", "disabled"]
    base += ["--data.language", str(BRACKETS), "--data.seq_len", "24", "--trainer.max_steps", "4"]
    assert main([*base, "--run.name", "full", "--data.probe_min_positions", "1"]) == 0
    assert main([*base, "--run.name", "knocked", "--data.knockout", "[bigram]"]) == 0
    assert "brackets can never fire" in capsys.readouterr().err
    knocked = load_timeline(tmp_path / "knocked" / "timeline.h5")
    assert knocked.empty_primitives == {"brackets": "'(' or '['"}
    assert not knocked.names("*brackets*") and "probe_excess/brackets" in load_timeline(
        tmp_path / "full" / "timeline.h5"
    ).names(group="probe")
    out = tmp_path / "analysis"
    assert main(["analyze", str(tmp_path / "full"), str(tmp_path / "knocked"), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| brackets | bigram | - | - | untestable: without bigram, brackets can never fire |" in report
    assert "leaves nothing that produces '(' or '['" in report
    found = json.loads((out / "ordering.json").read_text())["dependence"]
    assert {d["y"]: d["lacks"] for d in found}["brackets"] == "'(' or '['"
