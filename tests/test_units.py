"""Units of a pooled analysis (analysis/units.py): the same model is never counted twice, and
runs of different lengths are read to the shortest."""

import dataclasses

import numpy as np
import pytest

from analysis.report import analyze_timelines
from analysis.units import pool_units
from devinterp.store.schema import MetricInfo
from devinterp.store.timeline import Group
from tests.test_analysis import synthetic_timeline

MIDPOINTS = {"bigram": 3.5, "induction": 5.0}


def run(seed: int, members: int = 4, jitter: int = 0, **model) -> object:
    return synthetic_timeline(
        MIDPOINTS, {}, members=members, seed=jitter, config={"model": {"seed": seed, "lr": 0.003, **model}}
    )


@pytest.mark.parametrize(
    "second, counted",
    [
        (dict(seed=0), []),  # the same seeds: every member repeats
        (dict(seed=1), [3]),  # seeds 1..4 against 0..3: three shared, member 3 (seed 4) is new
        (dict(seed=4), [0, 1, 2, 3]),  # disjoint seeds
        (dict(seed=0, compile=True, members_per_pass=2), []),  # only how the step is computed differs
        (dict(seed=0, lr=0.01), [0, 1, 2, 3]),  # another learning rate: other models
    ],
)
def test_overlapping_seeds_count_each_member_once(second, counted):
    first, other = run(0), run(jitter=1, **second)
    pool = pool_units([first, other])
    assert pool.keep == {0: [0, 1, 2, 3], 1: counted}
    assert len(pool.repeats) == 4 - len(counted)
    result = analyze_timelines([first, other])
    assert result.n_units == 4 + len(counted)
    assert all(len(units) == 4 + len(counted) for units in result.onsets["probe"].values())


def test_identical_first_losses_are_the_same_model_whatever_the_config_says():
    losses = np.random.default_rng(0).uniform(2, 3, size=(10, 1, 4))
    with_loss = []
    for seed in (0, 9):
        timeline = run(seed)
        train = Group(np.arange(10), losses, (MetricInfo("train/loss", "train", "all", "all", sparse=True),))
        with_loss.append(dataclasses.replace(timeline, groups={**timeline.groups, "train": train}))
    pool = pool_units(with_loss)
    assert pool.keep[1] == []
    assert [(u.member, e.member) for u, e in pool.repeats] == [(k, k) for k in range(4)]


def test_runs_of_different_lengths_are_censored_at_the_shortest():
    """The shorter run ends before induction's onset: every unit is censored there, the longer
    run's members too, so "never learned by the end" means the same in both."""
    long, short = run(0), run(8)
    cut = 60  # induction's t50 is near exp(5) = 148
    groups = {}
    for name, g in short.groups.items():
        groups[name] = Group(g.steps[g.steps <= cut], g.values[g.steps <= cut], g.infos)
    short = dataclasses.replace(short, groups=groups)
    result = analyze_timelines([long, short])
    assert result.pool.horizon == cut and result.n_units == 8
    assert all(o.censored and o.step == cut for o in result.onsets["probe"]["induction"])
    assert not any(o.censored for o in result.onsets["probe"]["bigram"])
