"""Primitive-specific baselines: progress against the best prediction without the primitive.

The knocked-out language's exact predictions, fed through the metric code as if they were a
model's, score at most 0 on every primitive that has a knock-out (0 where the pure knock-out is
the best mixture), and the true distribution scores 1: weight-derived metrics and probe metrics
alike, on seed.yaml and rich.yaml.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.onset import primitive_onsets
from analysis.timeline import Group, Timeline
from devinterp.baselines import best_mixture, mixture_kl
from devinterp.data import ToyLanguageData
from devinterp.metrics import HeadlineMetrics
from devinterp.probe import grouped_mean, position_losses
from devinterp.schema import MetricInfo, progress
from tests.conftest import ROOT

LANGUAGES = {name: ROOT / "configs" / "languages" / f"{name}.yaml" for name in ("seed", "rich")}


def test_best_mixture_is_no_worse_than_either_end_and_finite():
    rng = np.random.default_rng(0)
    target = rng.dirichlet(np.ones(6), size=20)
    knocked_out = rng.dirichlet(np.ones(6), size=20)
    knocked_out[:, 0] = 0.0  # the knock-out misses a token the truth has
    knocked_out /= knocked_out.sum(1, keepdims=True)
    kl, share = best_mixture(target, knocked_out)
    assert np.isinf(mixture_kl(target, knocked_out, 0.0)) and np.isfinite(kl) and 0 < share <= 1
    assert kl <= mixture_kl(target, knocked_out, 1.0) + 1e-12
    grid = min(mixture_kl(target, knocked_out, a) for a in np.linspace(1e-4, 1, 2001))
    assert kl == pytest.approx(grid, rel=1e-4)  # the convex minimum, found by brute force too
    exact, share = best_mixture(target, target)  # a knock-out that is already the truth
    assert exact == pytest.approx(0.0, abs=1e-9) and share == 0.0


def knocked_out_predictions(language, tokens_by_row: list[np.ndarray], primitive: str) -> np.ndarray:
    """The knocked-out language's exact next-token distributions at each context's last slot."""
    out = language.knock_out([primitive])
    return np.stack([out.true_next_dist(tokens[None])[0, -1] for tokens in tokens_by_row])


def as_log_q(dist: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.log(np.maximum(dist, 1e-300))).float()[None]  # (1, n, V)


@pytest.mark.parametrize("name", ["seed", "rich"])
def test_weight_metrics_score_the_knock_out_at_most_zero_and_the_truth_one(name):
    data = ToyLanguageData(language=str(LANGUAGES[name]), seq_len=32, probe_size=4)
    language = data.language
    headline = HeadlineMetrics(language, 32)
    visible = [np.array(c.tokens) for _, c in headline.contexts]
    truth = np.stack([language.true_next_dist(t[None])[0, -1] for t in visible])
    np.testing.assert_allclose(headline.kl(as_log_q(truth)).numpy(), 0.0, atol=2e-5)  # progress 1
    checked = 0
    for primitive in language.primitives[:-1]:
        mine = [m for m, i in enumerate(headline.infos) if i.primitive == primitive.name]
        if not mine:
            continue
        predicted = knocked_out_predictions(language, visible, primitive.name)
        kl = headline.kl(as_log_q(predicted)).double().numpy()[:, 0]
        for m in mine:
            info = headline.infos[m]
            assert info.fallback_from == "knock_out" and info.fallback <= info.nothing + 1e-9
            reached = progress(kl[m], info.fallback, info.learned)
            assert reached <= 1e-4, (info.name, reached)
            checked += 1
    assert checked >= 10
    category = [i for i in headline.infos if i.primitive == "category"]
    assert category and all(i.fallback_from == "uniform" and i.fallback == i.nothing for i in category)


@pytest.mark.parametrize("name", ["seed", "rich"])
def test_probe_metrics_score_the_knock_out_at_most_zero_and_the_truth_one(name):
    from callbacks.probe_metrics import ProbeMetrics

    data = ToyLanguageData(language=str(LANGUAGES[name]), seq_len=32, probe_size=24)
    language, probe = data.language, data.probe
    callback = ProbeMetrics()

    class Module:
        class cfg:
            n_layers, n_heads, n_members = 1, 1, 1

    class Trainer:
        datamodule = data
        callbacks = []

    class Writer:
        def declare(self, group):
            self.group = group

    import callbacks.probe_metrics as probe_metrics

    writer = Writer()
    original, probe_metrics.find_writer = probe_metrics.find_writer, lambda trainer: writer
    try:
        callback.setup(Trainer(), Module(), "fit")
    finally:
        probe_metrics.find_writer = original
    infos = {i.name: i for i in writer.group.infos}
    tokens = probe.tokens.numpy()
    labels, rules = probe.labels[:, 1:], probe.rules[:, 1:]

    def excess(dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_q = torch.from_numpy(np.log(np.maximum(dist, 1e-300)))[None]  # (1, n, T-1, V)
        _, kl = position_losses(
            log_q, probe.tokens[None, :, 1:], probe.true_next.double(), probe.true_plogp.double()
        )
        flat = kl.flatten(1)
        return (grouped_mean(flat, labels.flatten(), len(language.label_names))[0].numpy(),
                grouped_mean(flat, rules.flatten(), len(language.rule_names))[0].numpy())  # fmt: skip

    by_label, _ = excess(probe.true_next.double().numpy())
    assert np.nanmax(np.abs(by_label)) < 1e-6  # the truth: excess 0, progress 1
    checked = 0
    for index, primitive in enumerate(language.primitives[:-1], start=1):
        if f"probe_excess/{primitive.name}" not in infos:
            continue  # no position of it in this probe set
        predicted = language.knock_out([primitive.name]).true_next_dist(tokens)[:, :-1]
        by_label, by_rule = excess(predicted)
        names = [(f"probe_excess/{primitive.name}", by_label[index])]
        names += [
            (
                f"probe_excess/{primitive.name}/{rule}",
                by_rule[language.rule_names.index(f"{primitive.name}/{rule}")],
            )
            for rule in primitive.rule_names
            if f"probe_excess/{primitive.name}/{rule}" in infos
        ]
        for metric, value in names:
            info = infos[metric]
            assert info.fallback_from == "knock_out"
            assert progress(value, info.fallback, 0.0) <= 1e-6, (metric, value, info.fallback)
            checked += 1
    assert checked >= 4


def test_a_fallback_driven_rise_is_not_learning_the_primitive():
    """A model that learns only induction's fallback (it predicts the language with induction
    knocked out, more and more): its uniform-based induction progress rises to about 0.59 (the
    issue's measurement), past the t50 onset; against the fallback it stays at or below 0."""
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
    fallback = progress(values[:, 0], info.fallback, 0.0)
    assert 0.55 < uniform[-1, 0] < 0.62  # the yardstick alone counts this as learned past t50
    assert fallback.max() <= 0.01 and fallback[-1, 0] > -0.05
    timeline = Timeline(
        Path("planted.h5"), {"every_step": Group(steps, values, (info,))}, {}, ("start", "induction")
    )
    by_uniform = primitive_onsets(timeline, ["induction"], source="weight", yardstick="uniform")["induction"][
        0
    ]
    by_fallback = primitive_onsets(timeline, ["induction"], source="weight")["induction"][0]
    assert not by_uniform.censored and 80 <= by_uniform.step <= 200
    assert by_fallback.censored


def test_variants_are_measured_on_the_full_runs_baselines():
    info = MetricInfo(
        "probe_excess/y", "probe", "y", "all", 2.0, 0.0, fallback=1.0, fallback_from="knock_out"
    )
    other = MetricInfo(
        "probe_excess/y", "probe", "y", "all", 2.0, 0.0, fallback=0.5, fallback_from="knock_out"
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
