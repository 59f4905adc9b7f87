"""The HDF5 timeline: one row per step, resumable, live-readable, and stops on divergence."""

import re
import subprocess
import sys
import time

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from analysis import TimelineError, load_timeline
from analysis.onset import primitive_progress
from callbacks import CircuitMetrics, NonFiniteMetricError, ProbeMetrics, TimelineWriter
from callbacks.timeline_writer import TimelineGroup
from devinterp.cli.main import main
from devinterp.data import ToyLanguageData
from devinterp.module import TensorTransformerModule
from devinterp.store.schema import GROUP_MARKER, MetricInfo
from tests.conftest import ROOT, SEED_SPEC_PATH

TINY = ROOT / "tests" / "data" / "tiny.yaml"
NAME = re.compile(r"^[a-z_]+/[^/\s]+(/[a-z_0-9]+)?$")


class RecordingLogger(Logger):
    """Keeps every log_metrics call, as W&B would receive them."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    name = "recording"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def fit(
    root,
    max_steps,
    ckpt_path=None,
    lr=3e-3,
    every_n_train_steps=None,
    logger=None,
    producers=(),
    writer_first=False,
    schedule="every_n_steps",
):
    """A tiny run; ``producers`` are more timeline producers, listed before the writer (after it
    with ``writer_first``)."""
    data = ToyLanguageData(
        language=str(SEED_SPEC_PATH),
        seq_len=16,
        batch_size=4,
        n_members=2,
        seed=0,
        probe_size=8,
        steps_per_block=4,
    )
    module = TensorTransformerModule(
        d_vocab=data.d_vocab,
        n_ctx=16,
        label_names=data.label_names,
        n_members=2,
        n_layers=2,
        n_heads=2,
        d_model=16,
        d_head=8,
        warmup_steps=2,
        lr=lr,
    )
    callbacks = [
        CircuitMetrics(diagnostics_every_n_steps=3, diagnostics_schedule=schedule),
        ProbeMetrics(every_n_steps=5, schedule=schedule),
        *producers,
    ]
    writer = TimelineWriter(flush_every_n_steps=4, n_snapshots=5)
    callbacks.insert(0 if writer_first else len(callbacks), writer)
    if every_n_train_steps:
        callbacks.append(
            ModelCheckpoint(
                dirpath=root / "checkpoints", every_n_train_steps=every_n_train_steps, save_top_k=-1
            )
        )
    trainer = L.Trainer(
        max_steps=max_steps,
        default_root_dir=root,
        logger=logger or False,
        callbacks=callbacks,
        enable_checkpointing=bool(every_n_train_steps),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        deterministic=True,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return root / "timeline.h5"


def read(path, group):
    with h5py.File(path, "r") as f:
        g = f[group]
        return g["step"][:], g["values"][:], [n.decode() for n in g["names"][:]], int(g["committed"][0])


def test_one_row_per_step_with_design_names_and_ground_truth(tmp_path):
    logger = RecordingLogger()
    path = fit(tmp_path, 12, logger=logger)
    steps, values, names, committed = read(path, "every_step")
    # steps 0..11 before each update, and step 12: the final weights, whose training losses have no batch
    np.testing.assert_array_equal(steps, np.arange(13))
    assert committed == 13 and values.shape[1:] == (len(names), 2)
    assert all(NAME.match(n) for n in names), [n for n in names if not NAME.match(n)]
    assert {
        "bigram/alice/kl",
        "skip_trigram/beach..big->at/kl",
        "induction/copy/kl",
        "train/loss",
        "train_loss/bigram",
    } <= set(names)
    # row 0 is the initial weights: W_U = 0, so every headline KL equals its "nothing learned" value
    with h5py.File(path, "r") as f:
        nothing = f["every_step/metric_info/nothing"][:]
        kinds = [k.decode() for k in f["every_step/metric_info/kind"][:]]
        weight = np.array([k == "weight" for k in kinds])
        np.testing.assert_allclose(values[0, weight], np.repeat(nothing[weight, None], 2, 1), rtol=1e-5)
        assert f["meta/schema_version"][()].decode() == "3"
        assert "skip_trigram" in f["meta/language_spec"][()].decode()
        assert [t.decode() for t in f["ground_truth/vocab"][:3]] == ["alice", "bob", "carol"]
        np.testing.assert_array_equal(f["ground_truth/skip_trigram/rules"][0], [22, 18, 26])  # beach, big, at
        snapshot_steps = f["snapshots/step"][:]
        assert snapshot_steps[0] == 0 and snapshot_steps[-1] == 12 and (snapshot_steps >= 0).all()
        np.testing.assert_array_equal(f["snapshots/W_U"][0], 0.0)  # initial unembedding
        assert np.abs(f["snapshots/W_U"][-1]).sum() > 0
    probe_steps, _, probe_names, _ = read(path, "probe")
    np.testing.assert_array_equal(probe_steps, [0, 5, 10, 12])
    assert {"probe_excess/bigram", "probe_excess/bigram/alice", "icl/score", "probe_loss/pos1"} <= set(
        probe_names
    )
    train = np.array([n.startswith("train") for n in names])
    assert np.isnan(values[-1, train]).all() and np.isfinite(values[-1, ~train]).all()
    assert np.isfinite(values[:-1, names.index("train/loss")]).all()
    np.testing.assert_array_equal(read(path, "diagnostics")[0], [0, 3, 6, 9, 12])
    # loggers: one dict per step for the weight rows, keys grouped by primitive
    per_step = [step for step, metrics in logger.calls if "bigram/weight_progress" in metrics]
    assert per_step == list(range(13))
    steps_sent = [step for step, _ in logger.calls]  # one dict per step, in order (W&B: one row each)
    assert steps_sent == sorted(set(steps_sent)) and steps_sent[-1] == 12
    assert {"probe/excess", "train/loss"} <= set(dict(logger.calls)[10])  # a probe step: one merged dict
    first = next(m for s, m in logger.calls if "bigram/weight_progress" in m)
    # step 0 predicts uniform: below the blind baseline, by as much as the recomputed progress says
    timeline = load_timeline(path)
    assert first["bigram/weight_progress"] < 0
    expected = np.median(primitive_progress(timeline, "bigram", "weight")[1][0])
    assert first["bigram/weight_progress"] == pytest.approx(expected, rel=1e-5)
    assert {"train/loss", "bigram/train_loss", "skip_trigram/weight_progress"} <= set(first)
    assert any("bigram/probe_excess" in m for _, m in logger.calls)


def test_resumed_run_has_every_step_once_and_equals_an_uninterrupted_run(tmp_path):
    whole = fit(tmp_path / "whole", 12)
    first_part = tmp_path / "parts"
    fit(first_part, 8, every_n_train_steps=4)  # rows up to step 7, then resume from step 4
    fit(first_part, 12, ckpt_path=first_part / "checkpoints" / "epoch=0-step=4.ckpt")
    for group in ("every_step", "probe", "diagnostics"):
        steps, values, names, committed = read(first_part / "timeline.h5", group)
        whole_steps, whole_values, whole_names, _ = read(whole, group)
        np.testing.assert_array_equal(steps, whole_steps)
        assert committed == len(steps) and names == whole_names
        np.testing.assert_allclose(values, whole_values, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_divergence_stops_with_the_step_and_keeps_the_rows(tmp_path, capsys):
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
            "--model.lr",
            "1000",
            "--model.warmup_steps",
            "1",
            "--trainer.max_steps",
            "40",
        ]
    )
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3
    match = re.search(r"training diverged: (\S+) is (nan|inf|-inf) for member \d at step (\d+)", message)
    assert match, message
    bad_step = int(match.group(3))
    steps, values, names, committed = read(tmp_path / "tiny" / "timeline.h5", "every_step")
    assert committed == len(steps) and steps[-1] >= bad_step - 1 and bad_step < 40
    probe_steps, probe_values, _, _ = read(tmp_path / "tiny" / "timeline.h5", "probe")
    everything = np.concatenate([values.ravel(), probe_values.ravel()])
    assert not np.isfinite(everything).all()  # the non-finite values themselves are recorded


def test_writer_flags_dense_but_not_sparse_nan(tmp_path):
    writer = TimelineWriter()
    infos = [
        MetricInfo("a/x/kl", "weight", "a", "x"),
        MetricInfo("train_loss/a", "train", "a", "all", sparse=True),
    ]
    writer.declare(TimelineGroup("every_step", infos, n_members=1))
    writer.path = tmp_path / "t.h5"
    writer.file = h5py.File(writer.path, "w")
    writer._create_group(writer.file, writer.groups["every_step"])
    writer.append("every_step", 0, torch.tensor([[1.0], [np.nan]]))
    writer.append("every_step", 1, torch.tensor([[0.5], [2.0]]))
    writer.commit()
    writer.append("every_step", 2, torch.tensor([[np.inf], [1.0]]))
    with pytest.raises(NonFiniteMetricError, match=r"a/x/kl is inf for member 0 at step 2"):
        writer.commit()
    writer.file.close()
    steps, values, _, committed = read(writer.path, "every_step")
    np.testing.assert_array_equal(steps, [0, 1, 2])
    assert committed == 3 and np.isinf(values[2, 0, 0])


def test_live_mode_can_be_read_while_the_run_writes(tmp_path):
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devinterp",
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
            "400",
            "--timeline.flush_every_n_steps",
            "5",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    path = tmp_path / "tiny" / "timeline.h5"
    seen, previous = [], {}
    deadline = time.time() + 240
    try:
        while run.poll() is None and time.time() < deadline:
            if path.exists():
                try:
                    timeline = load_timeline(path)
                except (TimelineError, KeyError):
                    time.sleep(0.2)  # created, groups not yet in place
                    continue
                steps = timeline.steps("every_step")
                np.testing.assert_array_equal(steps, np.arange(len(steps)))
                assert np.isfinite(timeline.values("train/loss")[steps < 400]).all()
                for name, group in timeline.groups.items():  # each read extends the one before it
                    if name in previous:
                        old_steps, old_values = previous[name]
                        np.testing.assert_array_equal(group.steps[: len(old_steps)], old_steps)
                        np.testing.assert_array_equal(group.values[: len(old_steps)], old_values)
                    previous[name] = (group.steps, group.values)
                seen.append(len(steps))
            time.sleep(0.1)
    finally:
        run.wait(timeout=300)
    assert run.returncode == 0, run.stderr.read()[-2000:]
    assert len({s for s in seen if 0 < s < 400}) >= 3, seen  # rows grew while the run was live
    final = load_timeline(path)
    assert len(final.steps("every_step")) == 401  # the final weights' row included
    for name, (steps, values) in previous.items():  # what was read live is what the file keeps
        np.testing.assert_array_equal(final.groups[name].values[: len(steps)], values)


def test_load_timeline_reads_committed_rows_and_progress(tmp_path):
    path = fit(tmp_path, 12)
    timeline = load_timeline(path)
    assert timeline.n_members == 2
    assert set(timeline.groups) == {
        "every_step",
        "diagnostics",
        "attribution",
        "composition",
        "probe",
        "strategy",
    }
    assert timeline.names("skip_trigram/*/kl") == [
        f"skip_trigram/{r}/kl"
        for r in ("beach..big->at", "garden..old->and", "lake..new->or", "office..small->to")
    ]
    # against uniform, step 0 (zero unembedding: the uniform prediction) is progress 0
    progress = timeline.progress("bigram/alice/kl", yardstick="uniform")
    assert progress.shape == (13, 2) and progress[0] == pytest.approx(0.0, abs=1e-6)
    assert ((progress >= -1e-6) & (progress <= 1)).all()  # unclipped: float rounding at 0
    # against the blind baseline (the default) and the knock-out, uniform is worse: below 0
    for yardstick in ("blind", "knock_out"):
        other = timeline.progress("bigram/alice/kl", yardstick)
        assert other.shape == (13, 2) and (other[0] < 0).all() and (other <= progress).all()
    np.testing.assert_array_equal(timeline.steps("probe_excess/bigram"), [0, 5, 10, 12])
    with pytest.raises(KeyError, match="not a progress metric"):
        timeline.progress("probe_acc/bigram")
    # a killed writer: rows past the last commit are not read back
    with h5py.File(path, "r+") as f:
        f["every_step/committed"][0] = 7
    assert len(load_timeline(path).steps("every_step")) == 7


def test_a_group_as_labelled_data_reads_only_the_chosen_committed_metrics(tmp_path):
    import devinterp.store.timeline as frames

    path = fit(tmp_path, 12)
    timeline = load_timeline(path)
    curves = frames.to_xarray(path, "every_step", "skip_trigram/*/kl")
    assert curves.dims == ("step", "metric", "member") and curves.shape == (13, 4, 2)
    assert list(curves.metric.values) == timeline.names("skip_trigram/*/kl")
    assert set(curves.primitive.values) == {"skip_trigram"} and set(curves.kind.values) == {"weight"}
    for name in timeline.names("skip_trigram/*/kl"):  # the same numbers as the reader's
        np.testing.assert_array_equal(curves.sel(metric=name).values, timeline.values(name))
    np.testing.assert_array_equal(curves.step.values, timeline.steps("every_step"))
    assert curves.sel(metric=timeline.names("skip_trigram/*/kl")[0]).blind.item() == pytest.approx(
        timeline.info(timeline.names("skip_trigram/*/kl")[0]).blind
    )
    frame = frames.to_dataframe(path, "probe", "probe_excess/bigram")
    assert list(frame.columns[:4]) == ["step", "metric", "member", "value"] and len(frame) == 4 * 2
    member_1 = frame[frame.member == 1].sort_values("step")
    np.testing.assert_array_equal(member_1.value, timeline.values("probe_excess/bigram")[:, 1])
    with h5py.File(path, "r+") as f:  # a killed writer: rows past the last commit are not read
        f["every_step/committed"][0] = 7
        f["every_step/values"][:, 0] = np.nan  # a column not asked for: never read
    again = frames.to_xarray(path, "every_step", "skip_trigram/*/kl")
    assert again.shape == (7, 4, 2) and np.isfinite(again.values).all()
    with pytest.raises(TimelineError, match="no metric group 'nope'"):
        frames.to_xarray(path, "nope")
    assert timeline.to_xarray("every_step", "skip_trigram/*/kl").shape == (7, 4, 2)  # from a Timeline


def killed_before_swmr(path) -> None:
    """A file whose writer was SIGKILLed after creating it, before switching to SWMR (what a
    version that named the timeline before its SWMR switch left on an early kill)."""
    code = (
        "import h5py, os, signal; f = h5py.File({!r}, 'w', libver='latest'); f.create_group('meta'); "
        "f.flush(); os.kill(os.getpid(), signal.SIGKILL)"
    ).format(str(path))
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_text("not hdf5"), "not a readable HDF5 file"),
        (lambda p: h5py.File(p, "w").close(), "not a timeline"),
        (
            lambda p: h5py.File(p, "w").create_dataset("meta/schema_version", data="99"),
            "unknown timeline schema version '99'",
        ),
        (lambda p: None, "no such timeline file"),
        (lambda p: killed_before_swmr(p), "killed while creating it, before any row was written"),
    ],
)
def test_load_timeline_refuses_other_files(tmp_path, make, message):
    path = tmp_path / "t.h5"
    make(path)
    with pytest.raises(TimelineError, match=message) as error:
        load_timeline(path)
    assert str(path) in str(error.value)


def test_expected_size_bounds_the_finished_file(tmp_path):
    """The space check before training must not underestimate what the run writes."""
    path = fit(tmp_path, 12)
    writer = TimelineWriter(n_snapshots=5)
    with h5py.File(path, "r") as f:
        groups = [g for g in f if f[g].attrs.get(GROUP_MARKER)]
        assert {"every_step", "diagnostics", "attribution", "composition", "probe"} <= set(groups)
        for group in groups:  # every group: the diagnostics cadence (3) unless said
            names = [n.decode() for n in f[group]["names"][()]]
            writer.declare(
                TimelineGroup(
                    group,
                    [MetricInfo(n, "weight", "p", "r") for n in names],
                    f[group]["values"].shape[2],
                    {"every_step": 1, "probe": 5}.get(group, 3),
                )
            )
        n_parameters = sum(
            f["snapshots"][k].size // f["snapshots"][k].shape[0]
            for k in f["snapshots"]
            if k not in ("step", "planned_step")
        )
    assert path.stat().st_size <= writer.expected_bytes(12, n_parameters)


def test_log_spaced_schedule_is_the_default_and_depends_on_the_step_alone(tmp_path):
    from devinterp.cadence import due_steps, log_interval

    assert len(due_steps(1500, "log", 10, 16)) + 1 <= 151  # no more probes than every 10 steps (+ the last)
    assert [log_interval(s, 16) for s in (0, 31, 32, 63, 64, 1000)] == [1, 1, 2, 2, 4, 32]
    np.testing.assert_array_equal(due_steps(600, "log", 10, 16), due_steps(1500, "log", 10, 16)[:99])
    assert ProbeMetrics().schedule == "log" and CircuitMetrics().diagnostics_schedule == "log"
    path = fit(tmp_path, 70, schedule="log")
    expected = [s for s in range(71) if s < 32 or (s < 64 and s % 2 == 0) or s % 4 == 0]
    np.testing.assert_array_equal(read(path, "probe")[0], expected + ([70] if 70 not in expected else []))
    np.testing.assert_array_equal(read(path, "diagnostics")[0], [s for s in expected if s < 70] + [70])


def test_a_slim_copy_keeps_every_metric_bit_for_bit_and_drops_the_weights(tmp_path):
    """analysis/slim.py: what a study commits beside its report; analyze reads it as a run with
    no snapshots."""
    from analysis.slim import main as slim_main
    from tests.helpers.golden import golden_run

    path = golden_run(tmp_path / "run", "seed")
    assert slim_main([str(path), str(tmp_path / "slim.h5")]) == 0
    full, slim = load_timeline(path), load_timeline(tmp_path / "slim.h5")
    assert (full.snapshot_steps >= 0).sum() == 5 and len(slim.snapshot_steps) == 0
    assert full.meta == slim.meta and full.label_names == slim.label_names
    assert set(full.groups) == set(slim.groups)
    for name, group in full.groups.items():
        np.testing.assert_array_equal(group.values, slim.groups[name].values)
        np.testing.assert_array_equal(group.steps, slim.groups[name].steps)
        assert list(map(repr, group.infos)) == list(map(repr, slim.groups[name].infos))  # NaN != NaN
    assert slim_main([str(path), str(path)]) == 1  # never over its source
