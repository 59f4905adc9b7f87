"""Real controls for ordering and stages, trained at the quickstart's size (issue: Stages of
training). Slow: each trains a 10- or 16-member run on the CPU (minutes); `make test-slow`."""

import math

import numpy as np
import pytest

from analysis.report import write_report
from analysis.stages import fit_stages, stage_data
from tests.conftest import ROOT, fit_quickstart

pytestmark = pytest.mark.slow


def test_two_parallel_primitives_are_reported_as_no_order(tmp_path):
    fit_quickstart(
        tmp_path,
        "parallel",
        "--data.language",
        str(ROOT / "configs/languages/parallel.yaml"),
        "--model.n_members",
        "16",
        "--trainer.max_steps",
        "400",
    )
    report = write_report([tmp_path / "parallel"], tmp_path / "analysis", stages=False).read_text()
    assert "No order: skip_a and skip_b" in report
    assert "skip_a -> skip_b" not in report and "skip_b -> skip_a" not in report


def test_a_curriculum_switch_is_a_sharp_boundary_and_no_switch_is_not(tmp_path):
    """Bigrams alone for 200 steps, then the full language: a sharp boundary within 0.1
    log-steps of step 200 in at least 90% of 10 members; the same run without the switch has
    no sharp boundary within 0.1 log-steps of it."""
    common = ["--model.n_members", "10", "--trainer.max_steps", "500"]
    switched = fit_quickstart(
        tmp_path, "switch", *common, "--data.knockin", "[bigram]", "--data.knockin_steps", "200"
    )
    control = fit_quickstart(tmp_path, "control", *common)
    near = []
    for timeline in (switched, control):
        stages = fit_stages(stage_data([timeline]))
        distance = np.full(len(stages.states), np.inf)
        for b in stages.boundaries:
            if b.sharp:
                distance[b.sequence] = min(distance[b.sequence], abs(math.log1p(b.step) - math.log1p(200)))
        near.append(distance)
    assert (near[0] <= 0.1).mean() >= 0.9, near[0]
    assert (near[1] > 0.1).all(), near[1]
