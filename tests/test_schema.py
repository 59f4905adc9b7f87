"""The timeline contract: one schema module, a reader that needs no torch and reads any group a
producer declares, files that describe themselves, and primitives that own their hooks."""

from devinterp.threads import ThreadTuner, available_cores

import subprocess
import sys

import h5py
import lightning as L
import numpy as np
import pytest
import torch
import yaml

from analysis import load_timeline
from callbacks.timeline_writer import TimelineGroup, find_writer
from devinterp.cli.main import main
from devinterp.errors import UsageError
from devinterp.language import parse_language
from devinterp.language.primitive import Firing, MinimalContext, Primitive
from devinterp.store.schema import GROUP_MARKER, MetricInfo
from tests.conftest import ROOT, SEED_SPEC_PATH
from tests.test_timeline import TINY, fit


class StepParity(L.Callback):
    """A new producer: its own group, written every other step (step % 2 and the summed W_U)."""

    timeline_groups = ("parity",)

    def setup(self, trainer, pl_module, stage):
        infos = [
            MetricInfo("parity/all/odd", "diagnostic", "parity", "all"),
            MetricInfo("parity/all/unembed_sum", "diagnostic", "parity", "all", unit="logit"),
        ]
        self.writer = find_writer(trainer)
        self.writer.declare(TimelineGroup("parity", infos, pl_module.cfg.n_members, every_n_steps=2))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step % 2 == 0:
            M = pl_module.cfg.n_members
            odd = torch.full((M,), float(step % 4 == 2))
            self.writer.append("parity", step, torch.stack([odd, pl_module.model.W_U.detach().sum((1, 2))]))


def test_a_group_from_a_new_producer_is_read_with_no_reader_change(tmp_path):
    path = fit(tmp_path, 9, producers=[StepParity()])
    timeline = load_timeline(path)
    assert set(timeline.groups) == {
        "every_step",
        "diagnostics",
        "attribution",
        "composition",
        "probe",
        "strategy",
        "parity",
    }
    np.testing.assert_array_equal(timeline.steps("parity"), [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(timeline.values("parity/all/odd")[:, 0], [0, 1, 0, 1, 0])
    assert timeline.info("parity/all/unembed_sum").unit == "logit"
    with h5py.File(path, "r") as f:  # the step-0 W_U is zero, the last snapshot equals its own sum
        assert timeline.values("parity/all/unembed_sum")[0].tolist() == [0.0, 0.0]
        assert f["parity"].attrs[GROUP_MARKER] == 1 and "ground_truth" not in timeline.groups


def test_a_producer_after_the_writer_is_refused_in_setup(tmp_path):
    with pytest.raises(UsageError, match=r"CircuitMetrics, ProbeMetrics must come before the TimelineWriter"):
        fit(tmp_path, 3, writer_first=True)


def test_reading_a_timeline_and_fitting_its_stages_imports_no_torch(tmp_path):
    path = fit(tmp_path, 4)
    code = (
        "import sys, analysis; t = analysis.load_timeline(sys.argv[1]); "
        "from analysis.stages import fit_stages, stage_data; fit_stages(stage_data([t]), range(1, 3)); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(len(t.steps('every_step')))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["5"]  # steps 0..4, the final weights included


def test_the_file_names_its_axes_and_keeps_the_whole_config(tmp_path, capsys):
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
            "--trainer.max_steps",
            "3",
            "--timeline.flush_every_n_steps",
            "2",
        ]
    )
    assert code == 0
    run = tmp_path / "tiny"
    with h5py.File(run / "timeline.h5", "r") as f:
        assert f["every_step/values"].attrs["axes"] == "row, metric, member"
        assert f["snapshots/W_Q"].attrs["axes"] == "snapshot, member, layer, pair, head, d_model, d_head"
        assert f["snapshots/W_E"].attrs["axes"] == "snapshot, member, vocab, d_model"
        assert len(f["snapshots/W_Q"].attrs["axes"].split(",")) == f["snapshots/W_Q"].ndim
        assert f["every_step/step"].attrs["unit"] == "optimiser steps"
        assert f["ground_truth/skip_trigram/kind"][()].decode() == "skip_trigram"
        config = yaml.safe_load(f["meta/config"][()].decode())
        compute = yaml.safe_load(f["meta/compute"][()].decode())
        n_vocab = len(f["ground_truth/vocab"])
    assert {"trainer", "model", "data", "probe", "circuits", "timeline", "run"} <= set(config)
    assert config["timeline"]["flush_every_n_steps"] == 2 and "flush_every_n_steps" not in config["circuits"]
    assert (
        config["model"]["d_vocab"] == n_vocab > 0 and config["trainer"]["max_steps"] == 3
    )  # linked values included
    # what the run computed with: run.threads resolved, BLAS capped the same, OpenMP waiting passively
    cores = available_cores()  # run.threads auto, one process: tuned over 1..cores from the first step
    assert compute["torch_threads"] == cores and compute["blas_threads"] == [cores]
    assert compute["tuned_over"] == ThreadTuner(cores).candidates
    assert compute["wait_policy"] == "PASSIVE" and compute["available_cores"] >= 1
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert "flush_every_n_steps" not in saved["circuits"] and saved["timeline"]["flush_every_n_steps"] == 2


class Echo(Primitive):
    """A primitive defined outside the package: after the marker token, the next token repeats the
    current one."""

    kind = "test_echo"
    extra_keys = {"marker"}

    def __init__(self, name, p, vocab, marker):
        super().__init__(name, p, vocab, rule_names=["echo"])
        self.marker = marker

    @classmethod
    def parse(cls, spec, vocab, field, name, p):
        return cls(name, p, vocab, vocab.token_id(spec["marker"], f"{field}.marker"))

    def fire(self, state, tokens, t):
        fires = tokens[:, t - 1] == self.marker if t else np.zeros(len(tokens), dtype=bool)
        return Firing(fires=fires, rule=np.where(fires, 0, -1), dist=tokens[:, t])

    def minimal_contexts(self):
        return [
            MinimalContext(0, (self.marker, v), (0, 1)) for v in range(self.vocab.size) if v != self.marker
        ]

    def ground_truth(self):
        return {"marker": np.array(self.marker)}


def test_a_primitive_registers_itself_by_being_defined():
    spec = yaml.safe_load(SEED_SPEC_PATH.read_text())
    spec["primitives"].insert(0, {"type": "test_echo", "name": "echo", "marker": "."})
    language = parse_language(spec)
    echo = language.primitives[0]
    assert isinstance(echo, Echo) and echo.weight_diagnostics() == [] and echo.qk_view() is None
    assert echo.open_positions(np.zeros((1, 4), dtype=np.int64)) is None
    assert Primitive.registry["test_echo"] is Echo
    assert language.label_names[1] == "echo" and len(echo.minimal_contexts()) == language.d_vocab - 1


def test_a_rich_run_report_draws_each_primitive_its_own_qk_figure(tmp_path, capsys):
    from analysis.report import write_report
    from analysis.report.weight_figures import qk_views
    from tests.helpers.golden import golden_run

    path = golden_run(tmp_path / "run", "rich")
    timeline = load_timeline(path)
    assert timeline.primitive_kinds["long_range"] == "long_range" and len(timeline.primitive_kinds) == 9
    # its 8-sequence probe holds brackets but no quote: the quote's attention-to-open has no
    # metric (a mean over no position is not a diverged model), the brackets' has one per head
    names = timeline.groups["probe"].names
    assert not [n for n in names if n.startswith("probe_attn/quote/")]
    assert len([n for n in names if n.startswith("probe_attn/brackets/")]) == 4
    views = qk_views(timeline)
    assert {
        name: (kind, view.query_role, view.key_role, view.offsets(16)[0], view.offsets(16)[-1])
        for name, (kind, view) in views.items()
    } == {
        "skip_trigram": ("skip_trigram", "trigger", "anchor", 1, 8),  # the stored max_skip
        "token_trigram": ("token_trigram", "second", "first", 1, 1),
        "long_range": ("long_range", "trigger", "cue", 12, 15),
    }  # min_distance 12 up to n_ctx - 1
    vocab = list(timeline.vocab)
    skip = views["skip_trigram"][1]
    assert {vocab[t] for t in skip.queries} == {"big", "old", "new", "small"}
    assert {vocab[t] for t in skip.keys} == {"beach", "garden", "lake", "office"}
    assert [vocab[t] for t in views["long_range"][1].keys] == ["alice", "carol"]
    write_report([path], tmp_path / "report", at_steps=[3, 1000])
    drawn = {p.name.split("_step")[0] for p in (tmp_path / "report").glob("qk_*_step*.png")}
    assert drawn == {"qk_skip_trigram", "qk_token_trigram", "qk_long_range"}
    # a step beyond the run is drawn at the last snapshot, and said so
    err = capsys.readouterr().err
    assert "--steps 1000: the nearest weight snapshot is at step 14" in err and "--steps 3:" not in err
