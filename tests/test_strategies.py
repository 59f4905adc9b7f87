"""Strategy curves: planted models that predict exactly as one strategy score 0 against it and the
strategies' own KL against the others; the group reaches the timeline and W&B."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from callbacks.probe_metrics import ProbeMetrics
from callbacks.timeline_writer import TimelineWriter
from devinterp.baselines import label_components
from devinterp.data import ToyLanguageData
from devinterp.language import load_language
from devinterp.probe import StrategyRows, evaluate_probe
from devinterp.strategies import StrategyTable, strategy_table

CHAIN = "configs/languages/markov_icl.yaml"
CIRCULANT = "configs/languages/markov_circulant.yaml"


class CountingModel(torch.nn.Module):
    """A planted model over the states s0..s2 (token ids 0..2): it predicts from the in-context
    counts of the visible tokens, (count + alpha) / (total + 3 alpha), of single tokens
    (``unigram``) or of the pairs that start with the current token (``bigram``), computed with
    cumulative sums of one-hot tokens, not the primitive's loop."""

    def __init__(self, statistics: str, n_members: int = 2, alpha: float = 1.0):
        super().__init__()
        self.statistics, self.alpha = statistics, alpha
        self.W_E = torch.nn.Parameter(torch.zeros(n_members, 3, 4))
        self.cfg = SimpleNamespace(n_members=n_members)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (member, batch, pos) -> logits
        one_hot = torch.nn.functional.one_hot(tokens, 3).double()  # (M, B, T, 3)
        if self.statistics == "unigram":
            counts = one_hot.cumsum(2)
        else:  # pairs (previous, next) seen so far, read at the current token's row
            pairs = one_hot[:, :, :-1, :, None] * one_hot[:, :, 1:, None, :]  # (M, B, T-1, 3, 3)
            seen = torch.cat([torch.zeros_like(pairs[:, :, :1]), pairs.cumsum(2)], 2)  # (M, B, T, 3, 3)
            counts = torch.einsum("mbtp,mbtpn->mbtn", one_hot, seen)
        return ((counts + self.alpha) / (counts.sum(-1, keepdim=True) + 3 * self.alpha)).log().float()


def chain_probe(path, n=64, seq_len=24):
    data = ToyLanguageData(language=path, seq_len=seq_len, batch_size=4, n_members=2, seed=0, probe_size=n)
    data.setup("fit")
    language = load_language(path)
    tokens, labels = data.probe.tokens.numpy(), data.probe.labels[:, 1:].numpy()
    components = label_components(language, language.context_oracles(seq_len), tokens, labels)
    return data.probe, strategy_table(language, tokens, labels, components)


def strategy_kl(table: StrategyTable, log_q: np.ndarray) -> np.ndarray:
    """The group's values from a model's log-probabilities on the whole probe set, log_q
    (member, n_probe, T-1, V) -> (member, n_strategies): mean KL(strategy || model) over each
    strategy's rows: a plain reference for the probe evaluation, which computes it batch by batch."""
    rows = log_q[:, table.sequence, table.position]  # (member, rows, V)
    kl = table.plogp[None] - np.einsum("rv,mrv->mr", table.probs.astype(np.float64), rows)
    sums = np.zeros((log_q.shape[0], len(table.infos)))
    np.add.at(sums.T, table.strategy, kl.T)
    return sums / np.bincount(table.strategy, minlength=len(table.infos))[None]


@pytest.mark.parametrize("statistics", ["unigram", "bigram"])
def test_a_model_that_is_one_strategy_is_at_distance_zero_from_it(statistics):
    probe, table = chain_probe(CHAIN)
    rows = StrategyRows.of(table, len(probe.tokens), "cpu")
    model = CountingModel(statistics)
    result = evaluate_probe(model, probe, 3, 4, batch_size=5, strategies=rows)  # batches across rows
    values = dict(zip(table.names, result.strategy_kl[0].tolist()))
    assert values[f"strategy_kl/chain/{statistics}"] == pytest.approx(0, abs=1e-5)
    other = "bigram" if statistics == "unigram" else "unigram"
    # against the other strategy: its own mean KL from the planted one, computed here in numpy
    language = load_language(CHAIN)
    strategies = language.primitives[0].strategies(probe.tokens.numpy())
    where = probe.labels[:, 1:].numpy() == 1
    s, q = strategies[other][:, :-1][where][:, :3], strategies[statistics][:, :-1][where][:, :3]
    expected = float((s * np.log(s / q)).sum(-1).mean())
    assert values[f"strategy_kl/chain/{other}"] == pytest.approx(expected, rel=1e-4)
    assert expected > 0.02
    # the probe's excess is the distance from the truth, which the bigram strategy is here
    excess = result.excess_by_label[0, 1].item()
    assert excess == pytest.approx(values["strategy_kl/chain/bigram"], abs=1e-5)


def test_the_batched_evaluation_equals_the_plain_reference():
    probe, table = chain_probe(CIRCULANT, n=20)
    model = CountingModel("unigram")
    rows = StrategyRows.of(table, len(probe.tokens), "cpu")
    result = evaluate_probe(model, probe, 3, 4, batch_size=3, strategies=rows)
    log_q = model(probe.tokens[None, :, :-1].expand(2, -1, -1)).double().log_softmax(-1).numpy()
    np.testing.assert_allclose(result.strategy_kl.numpy(), strategy_kl(table, log_q), rtol=1e-4, atol=1e-6)
    assert {n.split("/")[-1] for n in table.names} == {
        "uniform",
        "order0",
        "order1",
        "order2",
        "unigram",
        "bigram",
        "circulant",
        "knock_out",
    }


def test_every_primitive_of_a_language_gets_uniform_oracles_and_knock_out(tmp_path):
    from tests.conftest import SEED_SPEC_PATH

    data = ToyLanguageData(
        language=str(SEED_SPEC_PATH), seq_len=16, batch_size=4, n_members=2, seed=0, probe_size=16
    )
    data.setup("fit")
    language = data.language
    tokens, labels = data.probe.tokens.numpy(), data.probe.labels[:, 1:].numpy()
    table = strategy_table(
        language, tokens, labels, label_components(language, language.context_oracles(16), tokens, labels)
    )
    for index, primitive in enumerate(language.primitives, start=1):
        if not (labels == index).any():
            continue
        names = {n.split("/")[-1] for n in table.names if n.split("/")[1] == primitive.name}
        expected = {"uniform", *(f"order{k}" for k in primitive.blind_orders)}
        if index < len(language.primitives):
            expected.add("knock_out")
        assert names == expected, primitive.name


def test_the_strategy_group_reaches_the_timeline_and_wandb(tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from analysis import load_timeline
    from devinterp.store.wandb_files import history, run_files
    from tests.helpers.tiny import tiny_parts, tiny_trainer

    wandb.finish()  # an in-process run of an earlier test (even a disabled one) would be reused
    data, module = tiny_parts(CHAIN, seq_len=24, probe_size=16, n_layers=1)
    logger = WandbLogger(project="test", save_dir=str(tmp_path), mode="offline")
    trainer = tiny_trainer(
        12,
        tmp_path,
        [ProbeMetrics(every_n_steps=4, schedule="every_n_steps"), TimelineWriter(flush_every_n_steps=4)],
        logger=logger,
    )
    trainer.fit(module, datamodule=data)
    logger.experiment.finish()
    timeline = load_timeline(tmp_path / "timeline.h5")
    names = timeline.names("strategy_kl/*", group="strategy")
    assert {n.split("/")[-1] for n in names} >= {"uniform", "unigram", "bigram"}
    steps = timeline.steps("strategy")
    np.testing.assert_array_equal(steps, [0, 4, 8, 12])
    uniform = timeline.values("strategy_kl/chain/uniform")  # (steps, member)
    # at step 0 the zero unembedding predicts uniform: distance 0 from the uniform strategy
    np.testing.assert_allclose(uniform[0], 0, atol=1e-6)
    bigram = timeline.values("strategy_kl/chain/bigram")
    np.testing.assert_allclose(bigram, timeline.values("probe_excess/chain"), rtol=1e-4)  # the truth here
    rows = {}
    for path in run_files(tmp_path / "wandb"):
        for row in history(path):
            if "strategy_kl/chain/bigram" in row:
                rows[int(row["trainer/global_step"])] = row
    assert sorted(rows) == [0, 4, 8, 12]
    for i, step in enumerate(steps):
        assert rows[int(step)]["strategy_kl/chain/bigram"] == pytest.approx(
            float(np.median(bigram[i])), rel=1e-5
        )
    # the report draws the curves and lists phases and switches
    from analysis.report import write_report

    report = write_report([tmp_path / "timeline.h5"], tmp_path / "report", stages=False).read_text()
    assert "## Strategies" in report and "![strategies_chain](strategies_chain.png)" in report
    assert "| uniform > unigram |" in report and "| unigram > bigram |" in report
    assert (tmp_path / "report" / "strategies_chain.png").stat().st_size > 10_000
