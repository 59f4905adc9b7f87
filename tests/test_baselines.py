"""Primitive-specific baselines: progress only the primitive's mechanism can earn.

Every prediction that cannot implement a primitive (the knocked-out language, the context-limited
oracles its type admits, estimated from an independent sample), fed through the metric code as if
it were a model's, scores at most 0 (plus the oracles' seed-to-seed spread) on the blind
yardstick, and the true distribution scores 1: weight-derived metrics and probe metrics alike, on
seed.yaml, rich.yaml and shared_outputs.yaml. Where an oracle is as good as the truth (a planted
language) the primitive is unmeasurable.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.onset import primitive_onsets
from devinterp.baselines import best_pool
from devinterp.data import ToyLanguageData
from devinterp.language.oracles import estimate_oracles
from devinterp.metrics.weights import HeadlineMetrics, adjacent_run
from devinterp.probe import grouped_mean, position_losses
from devinterp.store.schema import MetricInfo, progress
from devinterp.store.timeline import Group, Timeline
from tests.conftest import ROOT

LANGUAGES = {
    name: ROOT / "configs" / "languages" / f"{name}.yaml" for name in ("seed", "rich", "shared_outputs")
}
SPREAD = 0.08  # seed-to-seed spread of blind progress: up to 0.074 (rich induction, 6 oracle seeds)


def pool_kl(target, components, pi, weights=None):
    V = target.shape[1]
    q = sum(p * components[k] for k, p in pi.items() if k != "uniform") + pi.get("uniform", 0) / V
    kl = (target * (np.log(np.where(target > 0, target, 1)) - np.log(np.where(target > 0, q, 1)))).sum(1)
    weights = np.ones(len(kl)) if weights is None else weights
    return float((weights * kl).sum() / weights.sum())


def test_best_pool_finds_the_convex_minimum_on_the_simplex():
    rng = np.random.default_rng(0)
    target = rng.dirichlet(np.ones(6), size=30)
    a = rng.dirichlet(np.ones(6), size=30)
    b = 0.5 * target + 0.5 * rng.dirichlet(np.ones(6), size=30)
    a[:, 0] = 0.0  # a component that misses a token the truth has
    a /= a.sum(1, keepdims=True)
    weights = rng.uniform(0.5, 2, size=30)
    kl, pi = best_pool(target, {"a": a, "b": b}, weights)
    assert set(pi) == {"a", "b", "uniform"} and sum(pi.values()) == pytest.approx(1.0)
    assert kl == pytest.approx(pool_kl(target, {"a": a, "b": b}, pi, weights), rel=1e-9)
    grid = min(  # brute force over the simplex
        pool_kl(target, {"a": a, "b": b}, {"a": x, "b": y, "uniform": 1 - x - y}, weights)
        for x in np.linspace(0, 1, 201)
        for y in np.linspace(0, 1, 201)
        if x + y <= 1 and x + y < 1 - 1e-9
    )
    assert kl <= grid + 1e-9 and kl == pytest.approx(grid, abs=5e-4)  # no worse than the grid's best
    exact, pi = best_pool(target, {"truth": target, "b": b})  # a component that is the truth
    assert exact == pytest.approx(0.0, abs=1e-6) and pi["truth"] > 0.999


def knocked_out_predictions(language, tokens_by_row: list[np.ndarray], primitive: str) -> np.ndarray:
    """The knocked-out language's exact next-token distributions at each context's last slot."""
    out = language.knock_out([primitive])
    return np.stack([out.true_next_dist(tokens[None])[0, -1] for tokens in tokens_by_row])


def as_log_q(dist: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.log(np.maximum(dist, 1e-300))).float()[None]  # (1, n, V)


def blind_predictions(language, primitive, headline, oracles):
    """Every prediction a model blind to ``primitive`` may make in the headline contexts: the
    knock-out (where it has one) and each oracle its type admits (from ``oracles``), (n, V)."""
    k = headline.tensors["tokens"].shape[1]
    tokens, live = headline.tensors["tokens"].numpy(), headline.tensors["live"].numpy()
    adjacent = np.zeros_like(live)
    for row, (_, context) in enumerate(headline.contexts):
        adjacent[row, k - adjacent_run(context.positions) :] = True
    found = {f"order{o}": oracles.predict(tokens, o, adjacent)[:, -1] for o in primitive.blind_orders}
    if primitive is not language.primitives[-1]:
        visible = [np.array(c.tokens) for _, c in headline.contexts]
        found["knock_out"] = knocked_out_predictions(language, visible, primitive.name)
    return found


@pytest.mark.parametrize("name", ["seed", "rich", "shared_outputs"])
def test_weight_metrics_score_blind_predictions_at_most_zero_and_the_truth_one(name):
    data = ToyLanguageData(language=str(LANGUAGES[name]), seq_len=32, probe_size=4)
    language = data.language
    headline = HeadlineMetrics(language, 32)
    visible = [np.array(c.tokens) for _, c in headline.contexts]
    truth = np.stack([language.true_next_dist(t[None])[0, -1] for t in visible])
    np.testing.assert_allclose(headline.kl(as_log_q(truth)).numpy(), 0.0, atol=2e-5)  # progress 1
    independent = estimate_oracles(language, 32, seed=11)  # not the sample the baselines used
    checked = 0
    for primitive in language.primitives:
        mine = [m for m, i in enumerate(headline.infos) if i.primitive == primitive.name]
        measured = [m for m in mine if headline.infos[m].measurable("blind")]
        mass = np.array([headline.infos[m].mass for m in measured])
        blind = np.array([headline.infos[m].blind for m in measured])
        for source, predicted in blind_predictions(language, primitive, headline, independent).items():
            kl = headline.kl(as_log_q(0.999 * predicted + 0.001 / language.d_vocab)).double().numpy()[:, 0]
            for m in mine:
                info = headline.infos[m]
                assert info.blind <= info.nothing + 1e-9 and np.isfinite(info.blind)
                if source == "knock_out":  # exact, no sampling: at most 0 rule by rule
                    assert progress(kl[m], info.knock_out, 0.0) <= 1e-3, (info.name, source)
            if measured:  # the primitive's progress: a ratio of sums over its rules
                reached = 1 - (mass * kl[measured]).sum() / (mass * blind).sum()
                assert reached <= SPREAD, (primitive.name, source, reached)
                checked += 1
    assert checked >= 4
    category = [i for i in headline.infos if i.primitive == "category"]
    assert category and all(np.isnan(i.knock_out) and i.blind <= i.nothing + 1e-9 for i in category)


def test_a_model_without_attention_cannot_earn_skip_trigram_progress():
    """The issue's measurement: the full language's p(next | current token), the best a model
    without attention can do, scored 0.60 skip-trigram progress against the knock-out alone. On
    the blind yardstick it scores at most 0 (plus the spread), weights and probe alike."""
    data = ToyLanguageData(language=str(LANGUAGES["seed"]), seq_len=64, probe_size=96)
    language, probe = data.language, data.probe
    independent = estimate_oracles(language, 64, seed=11)
    headline = HeadlineMetrics(language, 64)
    order1 = blind_predictions(language, language.primitives[1], headline, independent)["order1"]
    kl = headline.kl(as_log_q(0.999 * order1 + 0.001 / language.d_vocab)).double().numpy()[:, 0]
    skip = [m for m, i in enumerate(headline.infos) if i.primitive == "skip_trigram"]
    mass = np.array([headline.infos[m].mass for m in skip])
    knock_out = 1 - (mass * kl[skip]).sum() / (mass * [headline.infos[m].knock_out for m in skip]).sum()
    blind = 1 - (mass * kl[skip]).sum() / (mass * [headline.infos[m].blind for m in skip]).sum()
    assert knock_out > 0.4 and blind <= SPREAD, (knock_out, blind)
    infos = probe_infos(data)
    excess_by_label, _ = probe_excess(data, independent.predict(probe.tokens.numpy(), 1)[:, :-1])
    info = infos["probe_excess/skip_trigram"]
    index = language.label_names.index("skip_trigram")
    assert progress(excess_by_label[index], info.knock_out, 0.0) > 0.4
    assert progress(excess_by_label[index], info.blind, 0.0) <= SPREAD


def probe_infos(data) -> dict[str, MetricInfo]:
    """The probe group's metric infos as ProbeMetrics.setup declares them."""
    from callbacks.probe_metrics import ProbeMetrics

    callback = ProbeMetrics()

    class Module:
        class cfg:
            n_layers, n_heads, n_members = 1, 1, 1

    class Trainer:
        datamodule = data
        callbacks = []

    class Writer:
        groups = {}

        def declare(self, group):
            self.groups[group.name] = group

    import callbacks.probe_metrics as probe_metrics

    writer = Writer()
    original, probe_metrics.find_writer = probe_metrics.find_writer, lambda trainer: writer
    try:
        callback.setup(Trainer(), Module(), "fit")
    finally:
        probe_metrics.find_writer = original
    return {i.name: i for i in writer.groups["probe"].infos}


def probe_excess(data, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean excess by label and by rule of predictions ``dist`` (n, T-1, V) on the probe set."""
    probe, language = data.probe, data.language
    dist = 0.999 * dist + 0.001 / language.d_vocab
    log_q = torch.from_numpy(np.log(np.maximum(dist, 1e-300)))[None]  # (1, n, T-1, V)
    _, kl = position_losses(
        log_q, probe.tokens[None, :, 1:], probe.true_next.double(), probe.true_plogp.double()
    )
    flat = kl.flatten(1)
    labels, rules = probe.labels[:, 1:].flatten(), probe.rules[:, 1:].flatten()
    return (grouped_mean(flat, labels, len(language.label_names))[0].numpy(),
            grouped_mean(flat, rules, len(language.rule_names))[0].numpy())  # fmt: skip


@pytest.mark.parametrize("name", ["seed", "rich", "shared_outputs"])
def test_probe_metrics_score_blind_predictions_at_most_zero_and_the_truth_one(name):
    data = ToyLanguageData(language=str(LANGUAGES[name]), seq_len=32, probe_size=24)
    language, probe = data.language, data.probe
    infos = probe_infos(data)
    by_label, _ = probe_excess(data, probe.true_next.double().numpy())
    assert np.nanmax(np.abs(by_label)) < 2e-3  # the truth (mixed 0.1% with uniform): progress 1
    tokens = probe.tokens.numpy()
    independent = estimate_oracles(language, 32, seed=11)
    checked = 0
    for index, primitive in enumerate(language.primitives, start=1):
        if f"probe_excess/{primitive.name}" not in infos:
            continue  # no position of it in this probe set
        predictions = {f"order{o}": independent.predict(tokens, o)[:, :-1] for o in primitive.blind_orders}
        if index < len(language.primitives):
            predictions["knock_out"] = language.knock_out([primitive.name]).true_next_dist(tokens)[:, :-1]
        for source, predicted in predictions.items():
            by_label, by_rule = probe_excess(data, predicted)
            info = infos[f"probe_excess/{primitive.name}"]  # over all its positions: a ratio of sums
            if source == "knock_out":
                assert progress(by_label[index], info.knock_out, 0.0) <= 2e-3
                for rule in primitive.rule_names:  # exact, no sampling: at most 0 rule by rule too
                    if (name := f"probe_excess/{primitive.name}/{rule}") in infos:
                        value = by_rule[language.rule_names.index(f"{primitive.name}/{rule}")]
                        assert progress(value, infos[name].knock_out, 0.0) <= 2e-3, name
            if info.measurable("blind"):
                reached = progress(by_label[index], info.blind, 0.0)
                assert reached <= SPREAD, (primitive.name, source, reached, info.blind_from)
                checked += 1
    assert checked >= 4


PLANTED = """
name: planted
categories: {NAME: [alice, bob], DET: [the, a], ADJ: [old, new], PREP: [at, near], END: ["."]}
start: {NAME: 1.0}
primitives:
  - type: token_trigram
    p: 1.0
    rules: [{first: the, second: old, output: at}]
  - type: bigram
    p: 1.0
    table: {the: {old: 1.0}, a: {new: 1.0}}
  - type: category
    transitions: {NAME: {DET: 1.0}, DET: {ADJ: 1.0}, ADJ: {PREP: 1.0}, PREP: {END: 1.0}, END: {NAME: 1.0}}
"""


def test_a_primitive_an_oracle_predicts_is_unmeasurable(tmp_path):
    """A planted token trigram decided by the current token alone ("old" follows only "the"): the
    order-1 oracle is the truth there, so its blind baseline is about 0 and its progress NaN."""
    spec = tmp_path / "planted.yaml"
    spec.write_text(PLANTED)
    data = ToyLanguageData(language=str(spec), seq_len=32, probe_size=24)
    headline = HeadlineMetrics(data.language, 32)
    trigram = [i for i in headline.infos if i.primitive == "token_trigram"]
    assert trigram and all(not i.measurable("blind") and i.measurable("knock_out") for i in trigram)
    info = probe_infos(data)["probe_excess/token_trigram"]
    assert not info.measurable("blind") and info.blind <= 0.2 * info.nothing
    steps, values = np.arange(3), np.full((3, 1, 2), 0.01)
    timeline = Timeline(
        Path("t.h5"), {"probe": Group(steps, values, (info,))}, {}, ("start", "token_trigram")
    )
    assert np.isnan(timeline.progress(info.name)).all()
    assert np.isfinite(timeline.progress(info.name, "knock_out")).all()


def test_a_fallback_driven_rise_is_not_learning_the_primitive():
    """A model that learns only induction's fallback (it predicts the language with induction
    knocked out, more and more): its uniform-based induction progress rises to about 0.59 (the
    issue's measurement), past the t50 onset; against the knock-out it stays at or below 0."""
    data = ToyLanguageData(language=str(LANGUAGES["seed"]), seq_len=64, probe_size=4)
    language = data.language
    headline = HeadlineMetrics(language, 64)
    m = next(i for i, info in enumerate(headline.infos) if info.name == "induction/copy/kl")
    info = headline.infos[m]
    visible = [np.array(c.tokens) for _, c in headline.contexts]
    without = knocked_out_predictions(language, visible, "induction")
    steps = np.arange(0, 1001, 10)
    mix = 1 / (1 + np.exp(-(np.log(steps + 1) - np.log(100)) / 0.3))  # from uniform to the knock-out
    V = language.d_vocab
    rows = []
    for t in mix:
        predicted = (1 - t) / V + t * (0.999 * without + 0.001 / V)
        rows.append(headline.kl(as_log_q(predicted)).double().numpy()[m])
    values = np.array(rows)[:, None, :]  # (N, 1 metric, 1 member)
    uniform = progress(values[:, 0], info.nothing, 0.0)
    knock_out = progress(values[:, 0], info.knock_out, 0.0)
    assert 0.55 < uniform[-1, 0] < 0.62  # the yardstick alone counts this as learned past t50
    assert knock_out.max() <= 0.01 and knock_out[-1, 0] > -0.05
    assert progress(values[:, 0], info.blind, 0.0).max() <= 0.01
    timeline = Timeline(
        Path("planted.h5"), {"every_step": Group(steps, values, (info,))}, {}, ("start", "induction")
    )
    by_uniform = primitive_onsets(timeline, ["induction"], source="weight", yardstick="uniform")["induction"][
        0
    ]
    by_knock_out = primitive_onsets(timeline, ["induction"], source="weight", yardstick="knock_out")
    by_blind = primitive_onsets(timeline, ["induction"], source="weight")["induction"][0]
    assert not by_uniform.censored and 80 <= by_uniform.step <= 200
    assert by_knock_out["induction"][0].censored and by_blind.censored


def test_variants_are_measured_on_the_full_runs_baselines():
    info = MetricInfo(
        "probe_excess/y", "probe", "y", "all", 2.0, 0.0, knock_out=1.5, blind=1.0, blind_from="order1 1.00"
    )
    other = MetricInfo(
        "probe_excess/y", "probe", "y", "all", 2.0, 0.0, knock_out=1.5, blind=0.5, blind_from="order1 1.00"
    )
    steps = np.arange(5)
    values = np.full((5, 1, 2), 0.5)
    full = Timeline(Path("a.h5"), {"probe": Group(steps, values, (info,))}, {}, ("start", "y"))
    variant = Timeline(Path("b.h5"), {"probe": Group(steps, values, (other,))}, {}, ("start", "y"))
    assert variant.progress("probe_excess/y")[0, 0] == pytest.approx(0.0)  # its own baseline
    assert variant.progress("probe_excess/y", baseline=full.baselines()["probe_excess/y"])[0, 0] == 0.5
    assert full.progress("probe_excess/y", "uniform")[0, 0] == pytest.approx(0.75)


def test_probe_counts_positions_and_gives_the_standard_error_of_each_excess(capsys):
    from devinterp.model import ModelConfig, TensorTransformer
    from devinterp.probe import evaluate_probe

    data = ToyLanguageData(language=str(LANGUAGES["seed"]), seq_len=16, probe_size=6, probe_min_positions=20)
    probe, language = data.probe, data.language
    counts = np.bincount(probe.labels[:, 1:].flatten().numpy(), minlength=len(language.label_names))[1:]
    assert counts.min() >= 20 and len(probe.tokens) in (12, 24, 48, 96)  # doubled until each has 20
    assert len(ToyLanguageData(language=str(LANGUAGES["seed"]), seq_len=16, probe_size=6).probe.tokens) == 6
    capped = ToyLanguageData(
        language=str(LANGUAGES["seed"]), seq_len=16, probe_size=6, probe_min_positions=10**4
    )
    assert (
        len(capped.probe.tokens) == 96
        and "notice: data.probe_min_positions: induction (" in capsys.readouterr().err
    )
    model = TensorTransformer(
        ModelConfig(d_vocab=language.d_vocab, n_ctx=16, n_members=2, d_model=16, d_head=8), 1
    )
    with torch.no_grad():
        model.W_O.normal_(0, 0.5)
        model.W_U.normal_(0, 0.5)
    result = evaluate_probe(model, probe, len(language.label_names), len(language.rule_names))
    with torch.no_grad():
        log_q = model(probe.tokens[None, :, :-1].expand(2, -1, -1)).double().log_softmax(-1)
    kl = (probe.true_next.double() * (torch.log(probe.true_next.double().clamp_min(1e-300)) - log_q)).sum(-1)
    labels = probe.labels[:, 1:]
    for index in range(1, len(language.label_names)):
        values = kl[:, labels == index]  # (member, positions), recomputed from activations
        n = values.shape[1]
        spread = result.excess_sq_by_label[:, index].double() - result.excess_by_label[:, index].double() ** 2
        se = (spread.clamp_min(0) * n / (n - 1) / n).sqrt()
        np.testing.assert_allclose(se.numpy(), (values.std(1) / n**0.5).numpy(), rtol=2e-3)


def test_best_pool_reaches_the_minimum_where_components_are_nearly_alike():
    """A truth that is 0.12 a + 0.88 b with b close to a (EM alone crawls there: its weights were
    still moving after 5000 steps), a third component equal to uniform on the support: the pool
    finds the truth's weights, a KL of 0 and a duality gap within the tolerance."""
    rng = np.random.default_rng(1)
    a = rng.dirichlet(np.ones(3), size=400)
    b = 0.9 * a + 0.1 * rng.dirichlet(np.ones(3), size=400)
    target = 0.12 * a + 0.88 * b
    same_as_uniform = np.full_like(a, 1 / 3)
    kl, pi = best_pool(target, {"a": a, "b": b, "flat": same_as_uniform})
    assert kl == pytest.approx(0.0, abs=1e-9)
    assert pi["a"] == pytest.approx(0.12, abs=1e-3) and pi["b"] == pytest.approx(0.88, abs=1e-3)
    assert pi["flat"] + pi["uniform"] < 1e-3
    q = sum(p * c for p, c in zip(pi.values(), (a, b, same_as_uniform, same_as_uniform)))
    gap = max(float((c * target / q).sum(1).mean()) for c in (a, b, same_as_uniform)) - 1
    assert gap <= 1e-9  # no component improves the pool: the global minimum of a convex objective
