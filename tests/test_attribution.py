"""Exact attribution: the parts sum to the forward pass's centred logit, a head's source shares
are the equal split of its expanded terms, and planted circuits are attributed to their heads."""

import itertools

import numpy as np
import pytest
import torch

from devinterp.language import load_language
from devinterp.metrics.attribution import centred_logit, logit_parts, shapley_weights
from devinterp.model import ModelConfig, TensorTransformer
from tests.conftest import SEED_SPEC_PATH
from tests.helpers.planted import planted_induction, planted_skip_trigram

LANGUAGE = load_language(SEED_SPEC_PATH)


def random_model(positions="rope", attention="bilinear", n_layers=2, n_heads=2, seed=0):
    cfg = ModelConfig(
        d_vocab=7,
        n_ctx=8,
        n_members=2,
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=6,
        d_head=4,
        positions=positions,
        attention=attention,
    )
    model = TensorTransformer(cfg, seed=seed).double()
    generator = torch.Generator().manual_seed(seed)  # not the global RNG: the same model in any test order
    with torch.no_grad():
        model.W_O.normal_(generator=generator)
        model.W_U.normal_(generator=generator)
    return model


def contexts(n=5, k=4, seed=0):
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, 7, size=(n, k)))
    positions = torch.arange(k).repeat(n, 1)
    live = torch.ones(n, k, dtype=torch.bool)
    live[0, :2] = False  # a context with empty slots, as a skip-trigram's
    readout = torch.from_numpy(rng.dirichlet(np.ones(7), size=n))
    return tokens, positions, live, readout


@pytest.mark.parametrize(
    "positions, attention, n_layers",
    [
        ("rope", "bilinear", 2),
        ("learned", "bilinear", 2),
        ("rope", "squared", 2),
        ("rope", "bilinear", 1),
        ("rope", "bilinear", 3),
    ],
)
def test_the_parts_sum_to_the_forward_pass(positions, attention, n_layers):
    model = random_model(positions, attention, n_layers)
    tokens, positions_, live, readout = contexts()
    parts = logit_parts(model, tokens, positions_, live, readout)
    expected = centred_logit(model, tokens, positions_, live, readout)
    assert parts.total.abs().min() > 1e-3  # the logits are not trivially 0
    torch.testing.assert_close(parts.total, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        parts.sources.sum(-1), parts.heads, rtol=1e-6, atol=1e-9
    )  # shares sum to a head


def test_at_step_0_every_part_is_zero():
    cfg = ModelConfig(d_vocab=7, n_ctx=8, n_members=2, n_heads=2, d_model=6, d_head=4)
    model = TensorTransformer(cfg, seed=0).double()  # W_O = W_U = 0 at initialisation
    tokens, positions, live, readout = contexts()
    parts = logit_parts(model, tokens, positions, live, readout)
    assert parts.total.abs().max() == 0 and parts.sources.abs().max() == 0


def test_source_shares_are_the_equal_split_of_the_expanded_terms():
    """A layer-1 head expanded by brute force: its input at every position is the sum of the
    sources (embedding, each layer-0 head); every term (q1 from s1, q2 from s2, k1 from s3, k2
    from s4, v from s5) is formed and shared equally among its distinct sources."""
    model = random_model("rope", "bilinear", n_layers=2, n_heads=2)
    tokens, positions, live, readout = contexts(n=3)
    parts = logit_parts(model, tokens, positions, live, readout)
    M, n = 2, 3
    x0 = model.embed(tokens[None].expand(M, -1, -1), positions) * live[None, :, :, None]
    pattern0 = model.attention_pattern(x0, 0, positions)  # (M, n, H, k, k)
    v0 = torch.einsum("mntd,mhde->mnhte", x0, model.W_V[:, 0])
    writes = torch.einsum("mnhij,mnhje,mhed->mnhid", pattern0, v0, model.W_O[:, 0])  # (M, n, H, k, D)
    sources = torch.stack([x0, writes[:, :, 0], writes[:, :, 1]], 2)  # (M, n, S, k, D)
    centred = readout - readout.mean(-1, keepdim=True)
    read = torch.einsum("mdv,nv->mnd", model.W_U, centred)
    for h in range(2):
        q, kk = [], []
        for s in range(3):
            qs, ks = model.queries_keys(sources[:, :, s], 1, positions)  # (M, P, n, H, k, dh)
            q.append(qs[:, :, :, h, -1])  # the last position's query: (M, P, n, dh)
            kk.append(ks[:, :, :, h])  # (M, P, n, k, dh)
        value = [
            torch.einsum(
                "mnkd,mde,mef,mnf->mnk", sources[:, :, s], model.W_V[:, 1, h], model.W_O[:, 1, h], read
            )
            for s in range(3)
        ]  # (M, n, k)
        share = torch.zeros(M, n, 3, dtype=torch.float64)
        for s1, s2, s3, s4, s5 in itertools.product(range(3), repeat=5):
            term = (
                torch.einsum("mnd,mnkd->mnk", q[s1][:, 0], kk[s3][:, 0])
                * torch.einsum("mnd,mnkd->mnk", q[s2][:, 1], kk[s4][:, 1])
                * value[s5]
            ).sum(-1)  # (M, n): summed over key positions
            distinct = {s1, s2, s3, s4, s5}
            for s in distinct:
                share[:, :, s] += term / len(distinct)
        torch.testing.assert_close(parts.sources[:, :, 1, h, :3], share, rtol=1e-8, atol=1e-12)


def test_shapley_weights_give_each_source_its_marginal_value_in_an_additive_game():
    weights = shapley_weights(3)
    values = torch.tensor(
        [sum((b >> s & 1) * (s + 1.0) for s in range(3)) for b in range(8)], dtype=torch.float64
    )
    torch.testing.assert_close(values @ weights, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_a_planted_induction_circuit_is_attributed_to_its_two_heads_and_their_composition():
    """[x, y, x] -> y on the planted model: the logit comes from layer 1 head 0, whose query reads
    the embedding and whose key reads layer 0 head 0 (the previous-token head); the value is the
    embedding: every term reads exactly {embed, L0H0}, so each gets half."""
    model = planted_induction(LANGUAGE)
    alice, sees = LANGUAGE.vocab.token_ids(["alice", "sees"], "test")
    tokens = torch.tensor([[alice, sees, alice]])
    positions, live = torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool)
    readout = torch.zeros(1, LANGUAGE.d_vocab, dtype=torch.float64)
    readout[0, sees] = 1.0
    parts = logit_parts(model, tokens, positions, live, readout)
    total = centred_logit(model, tokens, positions, live, readout)
    assert total.item() > 10  # the planted model predicts y
    torch.testing.assert_close(parts.total, total, rtol=1e-6, atol=1e-9)
    induction = parts.heads[0, 0, 1, 0].item()
    assert induction == pytest.approx(total.item(), rel=1e-9)  # all of it through L1H0
    assert parts.direct.abs().item() < 1e-9 and parts.heads[0, 0, 0].abs().max() < 1e-9  # L0 writes no logit
    names = parts.source_names
    share = dict(zip(names, parts.sources[0, 0, 1, 0].tolist()))
    assert share["embed"] == pytest.approx(induction / 2, rel=1e-9)
    assert share["L0H0"] == pytest.approx(induction / 2, rel=1e-9)
    assert abs(share["L0H1"]) < 1e-9


def test_a_planted_skip_trigram_head_carries_the_skip_rules_logit():
    model = planted_skip_trigram(LANGUAGE)
    skip = next(p for p in LANGUAGE.primitives if p.kind == "skip_trigram")
    a, b, c = skip.rules[0].tolist()
    tokens = torch.tensor([[a, b]])
    positions, live = torch.tensor([[0, 3]]), torch.ones(1, 2, dtype=torch.bool)  # A three before B
    readout = torch.zeros(1, LANGUAGE.d_vocab, dtype=torch.float64)
    readout[0, c] = 1.0
    parts = logit_parts(model, tokens, positions, live, readout)
    total = centred_logit(model, tokens, positions, live, readout)
    assert total.item() > 10
    assert parts.heads[0, 0, 0, 0].item() == pytest.approx(total.item(), rel=1e-9)
    assert parts.direct.abs().item() < 1e-9


def test_rule_attribution_averages_the_headline_contexts_and_sums_to_their_logits():
    from devinterp.metrics.attribution import RuleAttribution

    cfg = ModelConfig(d_vocab=LANGUAGE.d_vocab, n_ctx=16, n_members=2, n_heads=2, d_model=8, d_head=4)
    model = TensorTransformer(cfg, seed=1).double()
    with torch.no_grad():
        model.W_O.normal_()
        model.W_U.normal_()
    rules = RuleAttribution(LANGUAGE, cfg)
    assert "induction/copy" in rules.rules and "bigram/alice" in rules.rules
    assert not any(r.startswith("category/") for r in rules.rules)  # category level: left out
    parts = rules.compute(model)
    assert parts.heads.shape == (2, len(rules.rules), 2, 2)
    logits = centred_logit(model, rules.tokens, rules.positions, rules.live, rules.readout)  # (M, n)
    expected = torch.einsum("rn,mn->mr", rules.average, logits)
    torch.testing.assert_close(parts.total, expected, rtol=1e-6, atol=1e-9)


def test_a_run_records_the_attribution_and_a_run_from_before_it_resumes(tmp_path):
    """The group ``attribution`` on the diagnostics cadence, its rule parts summing to the rule's
    centred logit; a run begun without the group (as by an older version) resumes, the group's
    rows starting at the resumed step."""
    import yaml

    from devinterp.cli.main import main
    from devinterp.store.timeline import load_timeline
    from tests.conftest import ROOT

    def fit(name, steps, *extra):
        argv = ["fit", "--config", str(ROOT / "tests" / "data" / "tiny.yaml"), "--run.root", str(tmp_path)]
        argv += ["--run.name", name, "--run.wandb_mode", "disabled", "--trainer.max_steps", str(steps)]
        argv += ["--model.n_layers", "2", "--run.checkpoint_every_n_steps", "3", *extra]
        assert main(argv) == 0

    fit("new", 6)
    timeline = load_timeline(tmp_path / "new" / "timeline.h5")
    attribution = timeline.groups["attribution"]
    assert list(attribution.steps) == list(timeline.groups["diagnostics"].steps)
    heads = [f"attr/induction/copy/L{layer}H{h}" for layer in range(2) for h in range(2)]
    total = timeline.values("attr/induction/copy/direct") + sum(timeline.values(n) for n in heads)
    assert np.abs(total[-1]).max() > 0  # the model has learned something by step 6
    sources = sum(timeline.values(f"attr/induction/copy/L1H0<-{s}") for s in ("embed", "L0H0", "L0H1"))
    np.testing.assert_allclose(sources, timeline.values("attr/induction/copy/L1H0"), rtol=1e-4, atol=1e-6)
    assert list(timeline.groups["composition"].steps) == list(attribution.steps)
    assert {"comp/k1/L0H0->L1H1", "comp/q2/L0H1->L1H0", "comp/k_joint_signed/L0H0->L1H0"} <= set(
        timeline.groups["composition"].names
    )
    out = ["--out", str(tmp_path / "out"), "--no-stages", "--steps", "2", "6", "--member", "1"]
    assert main(["analyze", str(tmp_path / "new"), *out]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Components (exact attribution)" in report and "| induction | " in report
    assert "Output `sees`:" in report and "| induction/copy | bigram/alice |" in report  # a shared output
    assert (tmp_path / "out" / "attribution.png").stat().st_size > 5000

    fit("old", 3, "--circuits.attribution", "false")
    config = tmp_path / "old" / "config.yaml"
    settings = yaml.safe_load(config.read_text())
    del settings["circuits"]["attribution"]  # as a version without it wrote the config
    config.write_text(yaml.safe_dump(settings))
    assert "attribution" not in load_timeline(tmp_path / "old" / "timeline.h5").groups
    assert main(["resume", str(tmp_path / "old"), "--trainer.max_steps", "6"]) == 0
    resumed = load_timeline(tmp_path / "old" / "timeline.h5")
    assert resumed.groups["attribution"].steps[0] == 3 and resumed.groups["every_step"].steps[0] == 0


def test_composition_per_pair_averages_to_the_old_score_and_its_sign_follows_the_key():
    from devinterp.metrics import circuits

    model = random_model("rope", "bilinear", n_layers=2, n_heads=2)
    with torch.no_grad():
        pairs, averaged = circuits.pair_composition(model, 0, 1), circuits.composition(model, 0, 1)
    torch.testing.assert_close(pairs["k"].mean(1), averaged["k"], rtol=1e-12, atol=0)  # the old name's score
    torch.testing.assert_close(pairs["q"].mean(1), averaged["q"], rtol=1e-12, atol=0)
    planted = planted_induction(LANGUAGE)  # L0H0 writes the previous token where L1H0's keys read it
    with torch.no_grad():
        signed = circuits.pair_composition(planted, 0, 1)
        assert signed["k_signed"][0, :, 0, 0].tolist() == pytest.approx([1.0, 1.0])
        planted.W_K[0, 1, 0, 0] *= -1  # the first pair now repels what L0H0 writes
        flipped = circuits.pair_composition(planted, 0, 1)
        assert flipped["k_signed"][0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0])
        assert flipped["k_joint_signed"][0, 0, 0].item() == pytest.approx(-1.0)
        planted.W_K[0, 1, 1, 0] *= -1  # both pairs repel: their product attends again
        assert circuits.pair_composition(planted, 0, 1)["k_joint_signed"][0, 0, 0].item() == pytest.approx(
            1.0
        )
        assert flipped["k"][0, :, 0, 0].tolist() == pytest.approx(
            signed["k"][0, :, 0, 0].tolist()
        )  # unsigned


def test_shares_reuse_and_serving_onsets_recover_a_planted_history():
    """A synthetic attribution group: L0H0 carries the bigram rule throughout; L1H0 takes over
    induction from step 40 on and also serves the bigram from step 80 (reused)."""
    from pathlib import Path

    from analysis.shares import component_shares, reuse_index, reused_heads, serving_onsets, top_heads
    from devinterp.store.schema import MetricInfo
    from devinterp.store.timeline import Group, Timeline

    steps = np.arange(0, 120, 10)
    components = ["direct", "L0H0", "L1H0"]
    rules = {"attr/bigram/alice": {"direct": 0.2, "L0H0": 1.0}, "attr/induction/copy": {"direct": 0.1}}
    names, columns = [], []
    for rule, parts in rules.items():
        for c in components:
            value = np.full(len(steps), parts.get(c, 0.0))
            if rule.endswith("copy") and c == "L1H0":
                value = np.where(steps >= 40, 2.0, 0.0)
            if rule.endswith("alice") and c == "L1H0":
                value = np.where(steps >= 80, 0.8, 0.0)
            names.append(f"{rule}/{c}")
            columns.append(np.repeat(value[:, None], 3, 1))  # 3 members alike
    group = Group(steps, np.stack(columns, 1), tuple(MetricInfo(n, "diagnostic", "x", "y") for n in names))
    timeline = Timeline(Path("synthetic.h5"), {"attribution": group}, {}, ("start", "bigram", "induction"))
    shares = component_shares(timeline)
    assert shares.primitives == ["bigram", "induction"] and shares.components == components
    final = shares.median()[-1]
    assert final[1, 2] == pytest.approx(2.0 / 2.1) and final[0, 1] == pytest.approx(1.0 / 2.0)
    assert np.abs(shares.shares).sum(2).max() == pytest.approx(1.0)  # absolute shares sum to 1
    assert reuse_index(shares, member=1)["L1H0"] == ["bigram", "induction"]
    onsets = serving_onsets(shares, member=2)
    assert (
        onsets["L1H0", "induction"] == 40 and onsets["L1H0", "bigram"] == 80 and onsets["L0H0", "bigram"] == 0
    )
    assert onsets["L0H0", "induction"] is None
    reused = reused_heads(shares)
    assert len(reused) == 3  # the three members alike
    assert reused[0].member == 0 and reused[0].component == "L1H0"
    assert reused[0].onsets == {"bigram": 80, "induction": 40}
    assert top_heads(shares)[:, 0].tolist() == [1, 2]  # bigram: L0H0; induction: L1H0


def test_a_large_share_of_a_tiny_mass_does_not_serve():
    """Planted: L1H0 holds all of a rule's logit while the logit is 1% of its final size (steps
    0-50), then a third of it once L0H0 has grown the logit (step 60 on). It serves from 60, not
    from 0; the figure's default steps are where the mass reaches 10, 50 and 90% of the end."""
    from pathlib import Path

    from analysis.shares import component_shares, serving_onsets
    from devinterp.store.schema import MetricInfo
    from devinterp.store.timeline import Group, Timeline

    steps = np.arange(0, 120, 10)
    grown = np.clip((steps - 50) / 40, 0, 1)  # L0H0's part: 0 until 50, 1 from 90 on
    parts = {"direct": 0 * grown, "L0H0": grown, "L1H0": np.where(steps >= 60, 0.5, 0.015)}
    columns = [np.repeat(v[:, None], 2, 1) for v in parts.values()]
    infos = tuple(MetricInfo(f"attr/skip/r/{c}", "diagnostic", "skip", "r") for c in parts)
    group = Group(steps, np.stack(columns, 1), infos)
    shares = component_shares(Timeline(Path("s.h5"), {"attribution": group}, {}, ("start", "skip")))
    assert shares.shares[0, 0, 2, 0] == pytest.approx(1.0)  # the whole of almost nothing
    assert shares.mass[-1, 0, 0] == pytest.approx(1.5) and shares.mass[0, 0, 0] == pytest.approx(0.015)
    assert serving_onsets(shares, member=0)["L1H0", "skip"] == 60
    total = shares.mass[:, 0, 0]
    at = shares.mass_steps(0)
    assert [int(steps[i]) for i in at] == sorted(
        {int(steps[np.argmax(total >= f * 1.5)]) for f in (0.1, 0.5, 0.9)}
    )
    assert total[at[0]] >= 0.15 and total[at[0] - 1] < 0.15


def test_the_mlp_interaction_matrix_reads_the_mlp_on_embeddings():
    from devinterp.metrics.attribution import mlp_eigen, mlp_interaction

    cfg = ModelConfig(d_vocab=7, n_ctx=8, n_members=2, d_model=6, d_head=4, n_heads=2, mlp=True, d_mlp=10)
    model = TensorTransformer(cfg, seed=2).double()
    read = torch.randn(2, 3, 6, dtype=torch.float64)
    q = mlp_interaction(model, 1, read)  # (M, n, V, V)
    pushes = torch.einsum("mvd,mnd->mnv", model.mlp(model.W_E[:, None], 1)[:, 0], read)  # from activations
    torch.testing.assert_close(q.diagonal(dim1=-2, dim2=-1), pushes)
    a, b = 1, 4  # two tokens together: MLP(E_a + E_b) = Q[a, a] + Q[b, b] + 2 Q[a, b] along read
    together = torch.einsum(
        "md,mnd->mn", model.mlp((model.W_E[:, a] + model.W_E[:, b])[:, None, None], 1)[:, 0, 0], read
    )
    torch.testing.assert_close(together, q[..., a, a] + q[..., b, b] + 2 * q[..., a, b])
    values, vectors = mlp_eigen(model, 1, read, k=2)
    torch.testing.assert_close(q @ vectors, vectors * values[..., None, :])  # eigenpairs
    assert (values[..., 0].abs() >= values[..., 1].abs()).all()


def test_an_mlp_run_records_the_interaction_eigenvalues_of_its_final_weights(tmp_path):
    from devinterp.cli.main import main
    from devinterp.metrics.attribution import MlpEigenMetrics
    from devinterp.module import TensorTransformerModule
    from devinterp.store.timeline import load_timeline
    from tests.conftest import ROOT

    argv = ["fit", "--config", str(ROOT / "tests" / "data" / "tiny.yaml"), "--run.root", str(tmp_path)]
    argv += [
        "--run.name",
        "mlp",
        "--run.wandb_mode",
        "disabled",
        "--trainer.max_steps",
        "5",
        "--model.mlp",
        "true",
    ]
    assert main(argv) == 0
    timeline = load_timeline(tmp_path / "mlp" / "timeline.h5")
    assert "attribution" not in timeline.groups  # no exact split with an MLP
    group = timeline.groups["mlp"]
    assert "mlp/L0/bigram/alice/eig1" in group.names and group.steps[-1] == 5
    checkpoint = torch.load(tmp_path / "mlp" / "checkpoints" / "last.ckpt", weights_only=True)
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    module = TensorTransformerModule(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    with torch.no_grad():
        expected = MlpEigenMetrics(LANGUAGE, module.cfg).compute(module.model).numpy()
    np.testing.assert_allclose(group.values[-1], expected, rtol=1e-4, atol=1e-6)
    assert np.abs(group.values[-1]).max() > 0
    assert main(["analyze", str(tmp_path / "mlp"), "--out", str(tmp_path / "out"), "--no-stages"]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## The MLP's direct path" in report and "| L0 | bigram/alice |" in report
