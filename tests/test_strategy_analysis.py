"""Strategy curves read back: planted curves with known crossings give their switch steps and
phases; runs of two languages paired by seed give the planted shift."""

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis.dependence import language_of, language_shifts
from analysis.onset import Onset
from analysis.strategies import (
    StrategyCurves,
    path_switches,
    phases,
    primitives_with_strategies,
    strategy_curves,
    switch_onsets,
)

STEPS = np.unique(np.round(np.geomspace(1, 5000, 300)).astype(int) - 1)


def sigmoid_drop(step: np.ndarray, at: float, high: float, low: float) -> np.ndarray:
    """A curve from ``high`` to ``low`` around ``at`` (sharp in log-step)."""
    return low + (high - low) / (1 + np.exp(6 * (np.log(step + 1) - np.log(at + 1))))


def planted_curves(unigram_at: list[float], bigram_at: list[float]) -> StrategyCurves:
    """Per member: the model leaves uniform for unigram at ``unigram_at`` and for bigram at
    ``bigram_at`` (each strategy's KL falls when the model moves onto it and rises after)."""
    kl = np.zeros((len(STEPS), 3, len(unigram_at)))
    for m, (u, b) in enumerate(zip(unigram_at, bigram_at)):
        kl[:, 0, m] = 0.2 - sigmoid_drop(STEPS, u, 0.2, 0.0)  # uniform: 0, then 0.2
        kl[:, 1, m] = sigmoid_drop(STEPS, u, 0.1, 0.02) + (0.08 - sigmoid_drop(STEPS, b, 0.08, 0.0))
        kl[:, 2, m] = sigmoid_drop(STEPS, u, 0.2, 0.12) - (0.12 - sigmoid_drop(STEPS, b, 0.12, 0.01))
    return StrategyCurves("chain", STEPS.astype(float), ["uniform", "unigram", "bigram"], kl)


def crossing(curves: StrategyCurves, a: str, b: str, member: int) -> float:
    """The last step at which ``b`` is not yet closer than ``a`` on the raw curves, plus one row."""
    gap = curves.of(a)[:, member] - curves.of(b)[:, member]
    below = np.flatnonzero(gap < 0)
    return float(STEPS[below[-1] + 1])


def test_switches_are_found_where_the_planted_curves_cross():
    curves = planted_curves([60, 80, 100], [300, 500, 900])
    for a, b in [("uniform", "unigram"), ("unigram", "bigram"), ("uniform", "bigram")]:
        onsets = switch_onsets(curves, a, b)
        assert [o.metric for o in onsets] == [f"chain:{a}>{b}"] * 3
        for member, onset in enumerate(onsets):
            truth = crossing(curves, a, b, member)
            assert not onset.censored and onset.method == "switch"
            assert abs(math.log(onset.step + 1) - math.log(truth + 1)) < 0.1, (
                a,
                b,
                member,
                onset.step,
                truth,
            )
    assert phases(curves) == [["uniform", "unigram", "bigram"]] * 3


def test_a_switch_that_never_happens_is_censored_and_skipped_phases_are_not_invented():
    curves = planted_curves([60, 60], [300, 1e9])  # member 1 never reaches bigram
    onsets = switch_onsets(curves, "unigram", "bigram")
    assert not onsets[0].censored
    assert onsets[1].censored and onsets[1].step == STEPS[-1]
    assert phases(curves)[1] == ["uniform", "unigram"]
    assert set(path_switches(curves)) == {
        "chain:uniform>unigram",
        "chain:uniform>bigram",
        "chain:unigram>bigram",
    }


class FakeTimeline:
    """What the strategy readers and language_shifts use of a Timeline."""

    def __init__(self, curves: StrategyCurves, seed: int, language: str):
        self.path = Path(f"/runs/{language}-{seed}/timeline.h5")
        self.groups = {"strategy": None}
        self.label_names = ("start", "chain", "category")
        self.meta = {
            "config": yaml.safe_dump({"model": {"seed": seed}}),
            "language_spec": f"name: {language}",
        }
        self._values = {f"strategy_kl/chain/{n}": curves.of(n) for n in curves.names}
        self._steps = curves.steps

    def names(self, pattern="*", group=None):
        import fnmatch

        return [n for n in self._values if fnmatch.fnmatchcase(n, pattern)]

    def values(self, name):
        return self._values[name]

    def steps(self, name):
        return self._steps


def test_the_reader_rebuilds_the_curves_from_a_timeline():
    curves = planted_curves([60], [300])
    timeline = FakeTimeline(curves, 0, "dirichlet")
    assert primitives_with_strategies(timeline) == ["chain"]
    read = strategy_curves(timeline, "chain")
    assert read.names == curves.names and read.declared == ["unigram", "bigram"]
    np.testing.assert_array_equal(read.kl, curves.kl)
    with pytest.raises(KeyError, match="no strategy curves for primitive 'category'"):
        strategy_curves(timeline, "category")


def test_runs_of_another_language_are_paired_by_seed_and_give_the_planted_shift():
    """The bigram switch comes 2x later in every member of the other language (+log 2 in
    log(step + 1), nearly): the shift, its interval and p say so; an unpaired seed is left out."""
    members = 8
    first = [
        FakeTimeline(planted_curves([60] * members, list(np.linspace(200, 400, members))), seed, "dirichlet")
        for seed in (0, 100)
    ]
    other = [
        FakeTimeline(
            planted_curves([60] * members, list(2 * np.linspace(200, 400, members))), seed, "circulant"
        )
        for seed in (0, 100, 555)
    ]
    assert language_of(other[0]) == "circulant"

    def events_of(timeline) -> dict[str, list[Onset]]:
        return path_switches(strategy_curves(timeline, "chain"))

    shifts = {s.event: s for s in language_shifts(first, other, events_of)}
    late = shifts["chain:unigram>bigram"].shift
    assert late.n_units == 2 * members  # seed 555 has no partner
    assert late.median == pytest.approx(math.log(2), abs=0.08)
    assert late.low > 0.5 and late.p < 0.001
    same = shifts["chain:uniform>unigram"].shift
    assert abs(same.median) < 0.05
