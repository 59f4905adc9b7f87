"""The yardstick's control: a model that cannot implement a primitive must score about 0 on it.

configs/controls/direct_path.yaml clamps every attention head to zero for the whole run, so the
model is its direct path W_E W_U: it reads the current token only. On the blind yardstick its
skip-trigram and induction progress stays at or below 0.05 at every step and member, probe and
weights alike, while its bigram progress rises (against the knock-out alone the same model
crossed t50 on skip-trigrams); `devinterp analyze` takes the run on its own.
"""

import numpy as np

from analysis.onset import primitive_progress
from analysis.report import write_report
from tests.conftest import ROOT, fit_quickstart

LIMIT = 0.05  # the control's ceiling on what it cannot implement


def test_a_direct_path_only_model_earns_no_attention_progress(tmp_path):
    control = str(ROOT / "configs/controls/direct_path.yaml")
    timeline = fit_quickstart(
        tmp_path, "direct_path", "--config", control, "--model.n_members", "2", "--trainer.max_steps", "300",
        "--trainer.enable_progress_bar", "false", "--timeline.n_snapshots", "0",
        "--circuits.diagnostics_every_n_steps", "50",
    )  # fmt: skip
    for source in ("probe", "weight"):
        for primitive in ("skip_trigram", "induction"):
            _, reached = primitive_progress(timeline, primitive, source)
            assert np.nanmax(reached) <= LIMIT, (source, primitive, np.nanmax(reached))
        _, bigram = primitive_progress(timeline, "bigram", source)
        assert bigram[-1].min() > 0.5, (source, bigram[-1])  # what the direct path can learn, it does
    # against the knock-out alone the same model earns skip-trigram progress: the confound
    _, knock_out = primitive_progress(timeline, "skip_trigram", "probe", "knock_out")
    assert knock_out[-1].min() > 0.3
    report = write_report([tmp_path / "direct_path"], tmp_path / "analysis", stages=False).read_text()
    assert "analysed on their own, as a control" in report and "direct_path" in report
