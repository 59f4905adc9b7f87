"""Onsets and ordering recover planted truth on synthetic timelines with known onsets."""

import math

import numpy as np
import pytest

from analysis.onset import Onset, changepoint_onsets, logistic_onsets, pelt, threshold_onsets
from analysis.ordering import compare, holm, infer_ordering, lead_lag, transitive_reduction

STEPS = np.arange(0, 5001, 5)
X = np.log(STEPS + 1)


def curves(midpoints, width=0.25, noise=0.03, seed=0):
    """Logistic progress in log-step, one column per midpoint, with Gaussian noise."""
    rng = np.random.default_rng(seed)
    mid = np.asarray(midpoints, dtype=float)
    return 1 / (1 + np.exp(-(X[:, None] - mid[None]) / width)) + rng.normal(0, noise, (len(X), len(mid)))


@pytest.mark.parametrize("midpoint", [3.5, 4.5, 6.5])
def test_detectors_recover_a_planted_midpoint(midpoint):
    progress = curves([midpoint, midpoint])
    planted = math.exp(midpoint) - 1
    t50 = threshold_onsets("m", STEPS, progress, 0.5)
    fit = logistic_onsets("m", STEPS, progress, n_boot=30)
    for onset in t50 + fit:
        assert not onset.censored
        assert abs(math.log(onset.step + 1) - midpoint) < 0.1, onset  # steps are 5 apart
    assert all(o.low <= o.step <= o.high for o in fit)
    assert fit[0].low <= planted * 1.2 and fit[0].high >= planted / 1.2
    change = changepoint_onsets("m", STEPS, progress)[0]
    assert not change.censored and math.log(change.step + 1) < midpoint  # learning starts before t50


def test_levels_are_ordered_and_never_learned_is_censored():
    progress = curves([4.0, 20.0])  # the second never rises within 5000 steps
    t10, t50, t90 = (threshold_onsets("m", STEPS, progress, level) for level in (0.1, 0.5, 0.9))
    assert t10[0].step < t50[0].step < t90[0].step
    for detector in (
        lambda: t50,
        lambda: logistic_onsets("m", STEPS, progress, n_boot=5),
        lambda: changepoint_onsets("m", STEPS, progress),
    ):
        never = detector()[1]
        assert never.censored and never.step == 5000.0


def test_pelt_finds_planted_changepoints():
    rng = np.random.default_rng(1)
    signal = np.concatenate([np.zeros(30), np.ones(40), 0.3 * np.ones(30)]) + rng.normal(0, 0.05, 100)
    assert pelt(signal, penalty=2 * 0.05**2 * math.log(100)) == [30, 70]
    assert pelt(rng.normal(0, 0.05, 100), penalty=2 * 0.05**2 * math.log(100)) == []


def onset(step, member, censored=False):
    return Onset("m", member, float(step), float(step), float(step), censored, "t50")


def test_compare_counts_censoring_and_clopper_pearson():
    xs = [onset(100, k) for k in range(10)]
    ys = [onset(300, k) for k in range(8)] + [onset(5000, 8, censored=True), onset(50, 9)]
    pair = compare("x", xs, "y", ys)
    assert (pair.n_units, pair.x_first, pair.y_first) == (10, 9, 1)
    assert pair.p_x_first == 0.9 and pair.p_x_first_low == pytest.approx(0.5550, abs=1e-3)
    assert pair.sign_p == pytest.approx(0.021484375)
    both_censored = compare("x", [onset(5000, 0, True)], "y", [onset(5000, 0, True)])
    assert both_censored.n_units == 0 and both_censored.sign_p == 1.0


def test_holm_and_transitive_reduction():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    edges = [("a", "b"), ("b", "c"), ("a", "c"), ("c", "d"), ("a", "d")]
    assert sorted(transitive_reduction(edges)) == [("a", "b"), ("b", "c"), ("c", "d")]


def synthetic_instance(rng, members=16, spread=0.3, noise=0.05):
    """Five primitives: A, then B after gap g1, C after g2, D tied with C, N never learned."""
    g1, g2 = rng.choice([0.3, 0.6, 0.9, 1.5], 2)
    start = rng.uniform(3.0, 4.0)
    planted = {"A": start, "B": start + g1, "C": start + g1 + g2, "D": start + g1 + g2, "N": 20.0}
    onsets = {}
    for name, midpoint in planted.items():
        member_midpoints = midpoint + rng.normal(0, spread, members)
        progress = 1 / (1 + np.exp(-(X[:, None] - member_midpoints[None]) / 0.25))
        progress = progress + rng.normal(0, noise, progress.shape)
        onsets[name] = threshold_onsets(name, STEPS, progress, 0.5)
    return planted, onsets


def test_ordering_recovers_planted_edges_over_100_synthetic_instances():
    rng = np.random.default_rng(2024)
    spread, alpha = 0.3, 0.01
    by_gap: dict[float, list[bool]] = {}
    true_positive = false_positive = missed = tie_edges = tie_pairs = 0
    for _ in range(100):
        planted, onsets = synthetic_instance(rng, spread=spread)
        ordering = infer_ordering(onsets, alpha=alpha)
        found = set(ordering.edges)
        for pair in ordering.pairs:
            gap = planted[pair.y] - planted[pair.x]
            truth = (pair.x, pair.y) if gap > 0 else (pair.y, pair.x)
            if gap == 0:
                tie_pairs += 1
                tie_edges += bool(pair.edge)
                continue
            by_gap.setdefault(round(min(abs(gap), 9.9), 1), []).append(truth in found)
            wrong_way = (truth[1], truth[0]) in found
            false_positive += wrong_way
            if abs(gap) >= 2 * spread:
                true_positive += truth in found
                missed += truth not in found
    precision = true_positive / (true_positive + false_positive)
    recall = true_positive / (true_positive + missed)
    assert precision >= 0.95 and recall >= 0.95, (
        precision,
        recall,
        {g: np.mean(v) for g, v in by_gap.items()},
    )
    # ties: an edge no more often than alpha allows (binomial upper tail at 0.001)
    assert tie_pairs == 100 and tie_edges <= 4
    # recall grows with the gap; at the spread itself it is low, as it must be with 16 members
    recall_by_gap = {g: float(np.mean(v)) for g, v in sorted(by_gap.items())}
    assert recall_by_gap[0.3] < 0.6 and recall_by_gap[0.6] >= 0.9 and recall_by_gap[0.9] == 1.0


def test_lead_lag_recovers_a_planted_lag():
    progress = curves([3.5, 4.5], noise=0.0)
    lag = lead_lag(STEPS, progress[:, 0], progress[:, 1])
    assert lag == pytest.approx(1.0, abs=0.15)
    assert lead_lag(STEPS, progress[:, 1], progress[:, 0]) == pytest.approx(-lag, abs=0.15)


# ---- dependence and the report, on synthetic timelines ---------------------------------------

from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from analysis.dependence import dependence  # noqa: E402
from analysis.report import analyze_timelines  # noqa: E402
from analysis.report.text import power_text  # noqa: E402
from devinterp.store.schema import MetricInfo  # noqa: E402
from devinterp.store.timeline import Group, Timeline  # noqa: E402


def synthetic_timeline(
    midpoints: dict[str, float],
    data_config: dict,
    members=16,
    seed=0,
    kinds: dict | None = None,
    config: dict | None = None,
) -> Timeline:
    """A timeline whose probe and weight progress follow planted log-step midpoints."""
    rng = np.random.default_rng(seed)
    steps = STEPS[::4]
    x = np.log(steps + 1)
    infos, columns = [], []
    for name, midpoint in midpoints.items():
        member_midpoints = midpoint + rng.normal(0, 0.2, members)
        progress = 1 / (1 + np.exp(-(x[:, None] - member_midpoints[None]) / 0.25))
        infos.append(MetricInfo(f"probe_excess/{name}", "probe", name, "all", 1.0, 0.0))
        columns.append(1 - progress)
    probe = Group(steps, np.stack(columns, 1), tuple(infos))
    weight = Group(
        steps,
        np.stack(columns, 1),
        tuple(MetricInfo(f"{n}/r/kl", "weight", n, "r", 1.0, 0.0) for n in midpoints),
    )
    return Timeline(
        Path("synthetic.h5"),
        {"every_step": weight, "probe": probe},
        {"config": yaml.safe_dump({"data": data_config, **(config or {})})},
        ("start", *midpoints),
        primitive_kinds=kinds or {},
    )


def test_dependence_verdicts_from_knock_out_and_knock_in():
    full = synthetic_timeline({"x": 3.5, "y": 5.0, "z": 5.0, "w": 5.5}, {})
    knockout = synthetic_timeline({"y": 6.0, "z": 5.0, "w": 20.0}, {"knockout": ["x"]}, seed=1)
    knockin = synthetic_timeline({"x": 3.5, "y": 4.3, "z": 5.0, "w": 5.5}, {"knockin": ["x"]}, seed=2)
    verdicts = {d.y: d for d in dependence(full, [knockout, knockin])}
    assert verdicts["y"].verdict == "Y needs X"
    assert verdicts["y"].knock_out.median == pytest.approx(1.0, abs=0.2)
    assert verdicts["y"].knock_out.low < 1.0 < verdicts["y"].knock_out.high
    assert verdicts["y"].knock_in.median == pytest.approx(-0.7, abs=0.2)
    assert verdicts["w"].verdict == "Y is delayed by removing X" and verdicts["w"].knock_out.blocked == 16
    assert verdicts["z"].verdict == "no evidence"


def test_analysis_pools_runs_and_orders_primitives():
    runs = [
        synthetic_timeline(
            {"bigram": 3.5, "induction": 5.0, "never": 20.0}, {}, 8, s, config={"model": {"seed": 8 * s}}
        )
        for s in range(2)  # seeds 0-7 and 8-15: 16 independent units
    ]
    result = analyze_timelines(runs)
    assert result.n_units == 16
    assert set(result.ordering.dag) == {("bigram", "induction"), ("induction", "never")}
    assert all(o.censored for o in result.onsets["probe"]["never"])
    assert result.lead_lag["bigram->induction"] == pytest.approx(1.5, abs=0.35)  # 8 jittered members


def with_strategy_curves(timeline: Timeline, unigram_at: list[float], bigram_at: list[float]) -> Timeline:
    """The timeline with a chain's planted strategy curves (tests/test_strategy_analysis.py)."""
    from dataclasses import replace

    from tests.test_strategy_analysis import planted_curves

    curves = planted_curves(unigram_at, bigram_at)
    infos = tuple(
        MetricInfo(f"strategy_kl/chain/{n}", "strategy", "chain", "all", math.nan, math.nan)
        for n in curves.names
    )
    group = Group(curves.steps.astype(np.int64), curves.kl, infos)
    return replace(
        timeline, groups={**timeline.groups, "strategy": group}, label_names=(*timeline.label_names, "chain")
    )


def test_dependence_times_strategy_switches_too():
    """Knocking out x delays the chain's bigram switch 2x in every member (its unigram switch
    stays): the switch event gets the delay verdict with about +log 2, the other none."""
    members = 8
    bigram_at = list(np.linspace(200, 400, members))
    full = with_strategy_curves(
        synthetic_timeline({"x": 3.5, "y": 5.0}, {}, members=members), [60] * members, bigram_at
    )
    knockout = with_strategy_curves(
        synthetic_timeline({"y": 5.0}, {"knockout": ["x"]}, members=members, seed=1),
        [60] * members,
        [2 * b for b in bigram_at],
    )
    verdicts = {d.y: d for d in dependence(full, [knockout])}
    late = verdicts["chain:unigram>bigram"]
    assert late.x == "x" and late.verdict == "Y is delayed by removing X"
    assert late.knock_out.median == pytest.approx(math.log(2), abs=0.1)
    assert verdicts["chain:uniform>unigram"].verdict == "no evidence"
    assert abs(verdicts["chain:uniform>unigram"].knock_out.median) < 0.05


def test_knock_in_times_the_other_primitives_from_the_switch():
    """Y not in the knock-in phase's data cannot form before the switch: planted to form exactly
    as long after the switch as it takes from scratch, its knock-in shift is 0, not a delay."""
    switch = 200
    full = synthetic_timeline({"x": 3.5, "y": 5.0, "c": 4.0}, {})
    late = float(np.log(np.exp(5.0) + switch))  # the full run's time to learn y, after the switch
    knockin = synthetic_timeline(
        {"x": 3.5, "y": late, "c": 4.0},
        {"knockin": ["x"], "knockin_steps": switch},
        seed=2,
        kinds={"x": "bigram", "y": "induction", "c": "category"},
    )
    verdicts = {d.y: d for d in dependence(full, [knockin])}
    shift = verdicts["y"].knock_in
    assert abs(shift.median) < 0.15 and shift.p > 0.01
    # the category fallback is in the first phase's data too: its clock starts at 0 (no shift)
    assert abs(verdicts["c"].knock_in.median) < 0.15
    # counted from step 0 instead, the same runs would show a delay of about log(348 / 148)
    raw = {
        d.y: d
        for d in dependence(full, [synthetic_timeline({"x": 3.5, "y": late}, {"knockout": ["x"]}, seed=2)])
    }
    assert raw["y"].knock_out.median == pytest.approx(late - 5.0, abs=0.15)


def mechanism_run(name: str, midpoints: dict, to_step=None, seed=1) -> Timeline:
    penalty = {"kind": "penalty", "metric": "mechanism/L0H*/prev_token_output", "weight": 10.0}
    if to_step is not None:
        penalty["to_step"] = to_step
    config = {"run": {"name": f"mechanism-{name}"}, "mechanism": {"interventions": [penalty]}}
    return synthetic_timeline(midpoints, {}, members=8, seed=seed, config=config)


def test_mechanism_variants_give_verdicts_and_the_sentence_with_numbers():
    from analysis.dependence import mechanism_effects, mechanism_sentences, variant_of

    full = synthetic_timeline({"bigram": 3.5, "induction": 5.0}, {}, members=8)
    released_at = 400  # log(401) = 6.0: released runs form induction after it
    suppressed = mechanism_run("prev", {"bigram": 3.5, "induction": 30.0})  # never forms
    released = mechanism_run("prev-400", {"bigram": 3.5, "induction": 6.6}, to_step=released_at, seed=2)
    control = mechanism_run("control", {"bigram": 3.5, "induction": 5.0}, seed=3)
    assert variant_of(suppressed) == ("mechanism", ["prev"])
    variants = [suppressed, released, control]
    effects = {(e.y, e.variant): e for e in mechanism_effects([full], variants)}
    needs = effects["induction", "prev"]
    assert needs.verdict == "induction needs prev" and needs.formed == 0 and needs.full_formed == 8
    assert effects["bigram", "prev"].verdict == "no evidence"  # bigram formed as usual
    after = effects["induction", "prev-400"]
    assert after.released_at == 400 and after.formed_after_release == 8
    assert after.verdict == "induction formed after the release"
    assert after.onset_median == pytest.approx(np.exp(6.6) - 1, rel=0.25)
    assert effects["induction", "control"].verdict == "no evidence"
    (sentence,) = mechanism_sentences(list(effects.values()), variants)
    assert sentence.startswith("induction needs prev: suppressed, it formed in 0 of 8 members within")
    assert "released at 400 (prev-400), it formed in 8 of 8, at a median of" in sentence
    assert sentence.endswith(f"(unsuppressed: formed in 8 of 8, median onset {needs.full_onset_median:.0f}).")
    # analyze puts them in the report's data; mechanism runs are not full runs
    result = analyze_timelines([full, *variants])
    assert result.n_units == 8 and len(result.mechanism) == 6 and not result.dependence


@pytest.mark.parametrize("n", [3, 8, 12])
def test_smallest_reachable_p_is_what_the_tests_give_when_every_unit_agrees(n):
    """All n units one way: the Wilcoxon p is the smallest the test can give (2 / 2^n), and
    Holm multiplies it by the number of pairs; 4 primitives (6 pairs) need 11 units for 0.01."""
    from analysis.ordering import smallest_holm_p, smallest_wilcoxon_p, units_needed

    early = [Onset("x", k, 10.0 + k, 10.0 + k, 10.0 + k, False, "t50") for k in range(n)]
    late = [Onset("y", k, 100.0 + 7 * k, 0, 0, False, "t50") for k in range(n)]
    pair = compare("x", early, "y", late)
    assert pair.wilcoxon_p == pytest.approx(smallest_wilcoxon_p(n))
    assert smallest_holm_p(n, 6) == pytest.approx(min(1.0, 6 * 2.0 ** (1 - n)))
    assert units_needed(6, 0.01) == 11 and smallest_holm_p(11, 6) < 0.01 <= smallest_holm_p(10, 6)


def test_the_report_warns_when_alpha_is_out_of_reach(tmp_path):
    runs = [synthetic_timeline({"a": 3.5, "b": 4.5, "c": 5.5, "d": 6.5}, {}, members=8)]
    text = power_text(analyze_timelines(runs).ordering, 8)
    assert "smallest Holm-corrected p any pair can reach is 0.047" in text
    assert "out of reach: no edge can be found" in text and "11 untied units would reach it" in text
    runs = [synthetic_timeline({"a": 3.5, "b": 4.5, "c": 5.5, "d": 6.5}, {}, members=16)]
    assert "below alpha" in power_text(analyze_timelines(runs).ordering, 16)


REPORTS = sorted((Path(__file__).resolve().parents[1] / "docs").rglob("report.md"))


@pytest.mark.parametrize("report", REPORTS, ids=[r.parent.name for r in REPORTS])
def test_every_image_a_shipped_report_links_exists(report):
    import re

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    assert links, report
    assert len(links) == len(set(links)), "a figure linked twice"
    assert [link for link in links if not (report.parent / link).is_file()] == []


def test_censored_shifts_are_printed_as_lower_bounds():
    from analysis.dependence import Shift
    from analysis.report.text import shift_text

    text = shift_text(Shift(3, 3, 0.16, 0.04, 0.16, 0.25, dropped=5))
    assert (
        text.startswith(">= +0.16 [>= +0.04, >= +0.16]") and "never formed in the variant in 3 of 3" in text
    )
    assert "5 pairs left out (formed in neither run)" in text
    assert shift_text(Shift(0, 0, math.nan, math.nan, math.nan, 1.0, dropped=8)).startswith(
        "formed in neither"
    )
    assert shift_text(Shift(8, 0, -0.5, -0.7, -0.3, 0.0078)) == "-0.50 [-0.70, -0.30], p 0.0078"


def parallel_instance(rng, members=16, shared=0.3, own=0.1, gap=0.0, noise=0.05, from_curves=True):
    """Two primitives learned in parallel: each member's speed (spread ``shared`` in log-step)
    moves both, and each primitive has its own jitter ``own``; Y planted ``gap`` after X. The
    onsets come from noisy progress curves through the t50 detector, or (``from_curves`` False)
    are the planted midpoints themselves."""
    speed = rng.uniform(3.0, 4.0) + rng.normal(0, shared, members)
    onsets = {}
    for name, offset in (("X", 0.0), ("Y", gap)):
        midpoints = speed + offset + rng.normal(0, own, members)
        if not from_curves:
            onsets[name] = [onset(math.expm1(m), k) for k, m in enumerate(midpoints)]
            continue
        progress = 1 / (1 + np.exp(-(X[:, None] - midpoints[None]) / 0.25))
        onsets[name] = threshold_onsets(name, STEPS, progress + rng.normal(0, noise, progress.shape), 0.5)
    return onsets


def test_no_true_order_gives_false_edges_within_the_binomial_bound_and_says_no_order():
    """500 synthetic instances of two primitives with no true order: edges no more often than
    alpha allows (binomial upper tail at 0.001), and "no order" (same time within the margin)
    said in nearly all; with a planted gap of 1 log-step, "no order" is never said. The 500 take
    their onsets as planted (the ordering test alone); 40 more go through curves and the t50
    detector, whose onsets sit on a grid (ties, so slower exact tests)."""
    from scipy.stats import binom

    rng = np.random.default_rng(500)
    alpha, n = 0.01, 500
    pairs = [
        infer_ordering(parallel_instance(rng, from_curves=False), alpha=alpha).pairs[0] for _ in range(n)
    ]
    assert sum(bool(p.edge) for p in pairs) <= binom.ppf(0.999, n, alpha)
    assert sum(p.same_time for p in pairs) >= 0.95 * n
    detected = [infer_ordering(parallel_instance(rng), alpha=alpha).pairs[0] for _ in range(40)]
    assert sum(bool(p.edge) for p in detected) <= binom.ppf(0.999, 40, alpha)
    assert sum(p.same_time for p in detected) >= 0.9 * 40
    apart = [infer_ordering(parallel_instance(rng, gap=1.0), alpha=alpha).pairs[0] for _ in range(20)]
    assert not any(p.same_time for p in apart) and all(p.edge == "x->y" for p in apart)


def test_a_censored_unit_never_counts_towards_the_same_time():
    formed = [onset(100 + m, m) for m in range(16)]
    never = [onset(5000, m, censored=True) for m in range(16)]
    half = formed[:8] + never[8:]
    assert compare("X", formed, "Y", formed).equivalence_p < 1e-3  # identical onsets: same time
    assert compare("X", formed, "Y", half).equivalence_p > 0.5  # half never formed Y


def test_a_small_consistent_gap_is_ordered_but_close_never_no_order():
    """Y after X in every member by 0.15 log-steps: the edge stands, the gap lies within the
    0.3 margin, and the pair is called close, not "no order" (the seed run's bigram and
    skip-trigram pass both tests)."""
    rng = np.random.default_rng(3)
    pair = infer_ordering(parallel_instance(rng, own=0.02, gap=0.15, from_curves=False)).pairs[0]
    assert pair.edge == "x->y" and pair.equivalence_holm_p < 0.01
    assert pair.close and not pair.same_time
    instance = parallel_instance(rng, shared=0.3, own=0.1, from_curves=False)
    alone = infer_ordering(instance).pairs[0]
    assert alone.same_time and not alone.close


def test_the_report_names_every_edge_another_yardstick_reverses_or_drops():
    """y is far from uniform from the start (its uniform baseline is 4x its blind one) and forms
    after x: on the blind yardstick (the default) x comes first, on uniform y (its progress starts
    at 0.75), and the report says that the edge is reversed on uniform and on knock-out (NaN here:
    uniform stands in)."""
    from dataclasses import replace

    from analysis.report.pipeline import yardstick_sensitivity

    run = synthetic_timeline({"x": 3.5, "y": 5.0}, {}, members=16)
    closer = lambda info: replace(info, nothing=4.0, blind=1.0) if info.primitive == "y" else info  # noqa: E731
    groups = {name: replace(g, infos=tuple(map(closer, g.infos))) for name, g in run.groups.items()}
    result = analyze_timelines([replace(run, groups=groups)])
    assert result.ordering.edges == (("x", "y"),)
    assert result.other_yardsticks == {"knock_out": (("y", "x"),), "uniform": (("y", "x"),)}
    assert yardstick_sensitivity(result) == [
        "Sensitivity: x -> y is reversed (y -> x) on the knock_out yardstick.",
        "Sensitivity: x -> y is reversed (y -> x) on the uniform yardstick.",
    ]
    same = analyze_timelines([run])  # every baseline uniform: nothing to flip
    assert same.other_yardsticks["uniform"] == same.ordering.edges and not yardstick_sensitivity(same)


@pytest.mark.parametrize("members, reachable", [(4, False), (8, True)])
def test_the_dependence_section_says_whether_its_verdicts_were_reachable(members, reachable):
    """4 paired members: the smallest Wilcoxon p is 2/16 = 0.125, so "no evidence" is "not
    testable"; 8: 2/256 = 0.0078 < 0.01."""
    from analysis.report.text import dependence_power_text

    full = synthetic_timeline({"x": 3.5, "y": 5.0}, {}, members=members)
    knockout = synthetic_timeline({"y": 6.0}, {"knockout": ["x"]}, members=members, seed=1)
    found = dependence(full, [knockout])
    assert found[0].knock_out.n_tested == members
    text = dependence_power_text(found, 0.01)
    assert ("out of reach" in text) is not reachable, text
    assert f"{2.0 ** (1 - members):.2g}" in text
