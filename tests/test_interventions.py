"""Mechanism interventions: the penalised metric against activations and its analytic gradient,
clamps held exactly through AdamW, the penalty's gradient equal to a penalised loss, bad input."""

import numpy as np
import pytest
import torch

from callbacks.mechanism_interventions import MechanismInterventions
from callbacks.timeline_writer import TimelineWriter
from devinterp.data import ToyLanguageData
from devinterp.errors import UsageError
from devinterp.interventions import check_against, parse_interventions
from devinterp.language import load_language
from devinterp.metrics.mechanisms import (
    PenaltyMetrics,
    copy_preference,
    offset_triples,
    offset_write,
    two_candidate_contexts,
)
from devinterp.model import ModelConfig, TensorTransformer
from devinterp.module import TensorTransformerModule
from tests.conftest import SEED_SPEC_PATH
from tests.helpers.planted import planted_induction
from tests.helpers.tiny import tiny_parts, tiny_trainer

SEQ_LEN = 24


def activation_offset_write(model: TensorTransformer, tokens: torch.Tensor, offset: int) -> torch.Tensor:
    """The same mean squared write, from the forward pass's own layer-0 pattern and values:
    (member, head), averaged over every position i >= offset of every sequence."""
    x = model._norm(model.embed(tokens[None].expand(model.cfg.n_members, -1, -1)))  # (M, B, T, D)
    pattern = model.attention_pattern(x, 0)  # (M, B, H, T, T)
    T = tokens.shape[1]
    rows = torch.arange(offset, T)
    weight = pattern[..., rows, rows - offset]  # (M, B, H, T - d)
    write = torch.einsum("mbtd,mhde,mhef->mbhtf", x, model.W_V[:, 0], model.W_O[:, 0])[..., rows - offset, :]
    return (weight.pow(2) * write.pow(2).sum(-1)).mean((1, 3))


@pytest.mark.parametrize(
    "positions, norm, attention",
    [("rope", False, "bilinear"), ("learned", False, "bilinear"), ("rope", True, "squared")],
)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_offset_write_equals_the_forward_pass(positions, norm, attention, offset):
    cfg = ModelConfig(
        d_vocab=7,
        n_ctx=12,
        n_members=2,
        n_heads=3,
        d_model=10,
        d_head=4,
        positions=positions,
        norm=norm,
        attention=attention,
    )
    model = TensorTransformer(cfg, seed=3).double()
    with torch.no_grad():
        model.W_O.normal_()  # zero at initialisation: every write would be 0
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 7, size=(9, 12)))
    triples, weights = offset_triples(tokens.numpy(), offset, by_position=positions == "learned")
    from_weights = offset_write(model, offset, torch.from_numpy(triples), torch.from_numpy(weights))
    torch.testing.assert_close(
        from_weights, activation_offset_write(model, tokens, offset), rtol=1e-10, atol=1e-12
    )
    assert from_weights.min() > 0


def test_penalty_gradient_is_the_analytic_derivative_on_a_planted_previous_token_head():
    """On the planted induction model (layer 0 head 0 attends i -> i - 1 and copies the token):
    value = sum_n w_n p_n^2 ||x_n W_V W_O||^2, so d/dW_O = sum_n w_n p_n^2 2 (x_n W_V)^T (x_n W_V W_O)
    and d/dW_V = sum_n w_n p_n^2 2 x_n^T (x_n W_V W_O) W_O^T, p_n read from the forward pass."""
    language = load_language(SEED_SPEC_PATH)
    model = planted_induction(language)
    tokens = torch.from_numpy(language.sample(16, 8, seed=1).tokens)
    triples, weights = offset_triples(tokens.numpy(), 1, by_position=True)
    value = offset_write(model, 1, torch.from_numpy(triples), torch.from_numpy(weights))  # (1, H)
    assert value[0, 0] > 1e-3 and value[0, 1] == 0  # the planted head writes; the other is empty
    grad_O, grad_V = torch.autograd.grad(value[0, 0], [model.W_O, model.W_V])

    x = model.embed(tokens[None])[0]  # (B, T, D)
    pattern = model.attention_pattern(x[None], 0)[0, :, 0]  # (B, T, T), head 0
    rows = torch.arange(1, 8)
    p = pattern[:, rows, rows - 1].flatten()  # (n,)
    assert p.abs().max() > 0.5  # it is a previous-token head
    keys = x[:, rows - 1].flatten(0, 1)  # (n, D)
    xv = keys @ model.W_V[0, 0, 0]  # (n, dh)
    write = xv @ model.W_O[0, 0, 0]  # (n, D)
    c = (p.pow(2) / len(p))[:, None]  # every (sequence, position) pair weighs the same
    expected_O = 2 * xv.T @ (c * write)
    expected_V = 2 * keys.T @ (c * write) @ model.W_O[0, 0, 0].T
    torch.testing.assert_close(grad_O[0, 0, 0], expected_O, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_V[0, 0, 0], expected_V, rtol=1e-10, atol=1e-12)
    assert grad_O[0, 0, 1].abs().max() == 0 and grad_O[0, 1].abs().max() == 0  # nothing else is pushed


def small(n_members: int) -> tuple[ToyLanguageData, TensorTransformerModule]:
    """The data and model every training test here uses (2 layers, 2 heads, d_model 16)."""
    return tiny_parts(seq_len=SEQ_LEN, n_members=n_members, batch_size=8, probe_size=16, lr=1e-2)


def run_with(tmp_path, interventions, steps=20, n_members=2, **trainer_args):
    data, module = small(n_members)
    start = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    callback = MechanismInterventions(interventions)
    trainer = tiny_trainer(steps, tmp_path, [callback, TimelineWriter(n_snapshots=0)], **trainer_args)
    trainer.fit(module, datamodule=data)
    return module, start, trainer, callback


def test_a_clamped_head_stays_exactly_as_clamped_over_20_adamw_steps(tmp_path):
    module, start, trainer, _ = run_with(
        tmp_path,
        [
            {"kind": "clamp", "component": "L0H1", "hold": "zero", "members": [0]},
            {"kind": "clamp", "component": "L1H0", "hold": "init"},
        ],
        steps=20,
    )
    m = module.model
    # zero: member 0's L0H1 output matrix stays 0 (weight decay and momentum would move it)
    assert m.W_O[0, 0, 1].abs().max() == 0
    assert m.W_O[1, 0, 1].abs().max() > 0  # member 1 is not clamped: its head learned
    # init: every weight of L1H0 is its initial value, bit for bit, in both members
    for name, index in (
        ("W_Q", (1, slice(None), 0)),
        ("W_K", (1, slice(None), 0)),
        ("W_V", (1, 0)),
        ("W_O", (1, 0)),
    ):
        for member in range(2):
            assert torch.equal(getattr(m, name)[member][index], start[name][member][index]), name
    assert m.W_O[:, 1, 0].abs().max() == 0  # so its output is exactly zero (W_O starts at 0)
    # the clamped head's output, from the forward pass, is exactly zero
    tokens = torch.randint(0, m.cfg.d_vocab, (2, 3, SEQ_LEN))
    x = m.embed(tokens)
    assert m.attention(x, 0)[0].abs().max() > 0  # layer 0 of member 0 still writes (head 0)
    per_head = torch.einsum(
        "mbhte,mhed->mbhtd",
        m.attention_pattern(x, 0) @ torch.einsum("mbtd,mhde->mbhte", x, m.W_V[:, 0]),
        m.W_O[:, 0],
    )
    assert per_head[0, :, 1].abs().max() == 0 and per_head[1, :, 1].abs().max() > 0
    # while the other weights moved
    assert not torch.equal(m.W_Q[:, 0], start["W_Q"][:, 0]) and not torch.equal(m.W_U, start["W_U"])
    assert not torch.equal(m.W_Q[:, 1, :, 1], start["W_Q"][:, 1, :, 1])


def test_a_released_clamp_starts_afresh_in_adamw(tmp_path):
    module, _, trainer, _ = run_with(
        tmp_path,
        [{"kind": "clamp", "component": "L0H0", "hold": "frozen", "from_step": 3, "to_step": 8}],
        steps=8,
    )
    state = trainer.optimizers[0].state[module.model.W_Q]
    # released after the last step: the slice's moments are zero, the other heads' are not
    assert state["exp_avg"][:, 0, :, 0].abs().max() == 0 and state["exp_avg_sq"][:, 0, :, 0].abs().max() == 0
    assert state["exp_avg_sq"][:, 0, :, 1].abs().max() > 0


def test_penalty_gradient_equals_that_of_the_penalised_loss(tmp_path):
    """One step with the penalty on member 1 only: the parameters move as under data loss +
    weight * metric (the same step taken by hand), member 0 as without the penalty."""
    weight = 50.0
    penalty = {
        "kind": "penalty",
        "metric": "mechanism/L0H*/prev_token_output",
        "weight": weight,
        "members": [1],
    }
    base, start, _, _ = run_with(tmp_path / "a", [], steps=3)
    penalised, _, trainer, callback = run_with(tmp_path / "b", [penalty], steps=3)
    assert torch.equal(penalised.model.W_E[0], base.model.W_E[0])  # member 0: no penalty
    assert not torch.equal(penalised.model.W_E[1], base.model.W_E[1])

    # by hand: the same 3 steps with the penalty in the loss
    data, module = small(2)
    metrics = PenaltyMetrics(data.language, module.cfg, data.probe.tokens.numpy())
    names = metrics.match(penalty["metric"])
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=1e-2, weight_decay=0.01, fused=True
    )  # as the module's
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 2)
    )  # warm-up 2
    batches = iter(data.train_dataloader())
    for _ in range(3):
        batch = next(batches)
        loss = module.token_losses(batch["tokens"]).mean(1).sum()
        value = torch.stack(list(metrics.values(module.model, names).values())).sum(0)  # (member,)
        loss = loss + weight * value[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(p, dict(penalised.model.named_parameters())[name], rtol=1e-5, atol=1e-6)


def test_the_timeline_records_window_value_and_gradient(tmp_path):
    from devinterp.store.timeline import open_timeline

    penalty = {
        "name": "prev",
        "kind": "penalty",
        "metric": "mechanism/L0H*/prev_token_output",
        "weight": 1.0,
        "from_step": 4,
        "to_step": 9,
    }
    _, _, _, callback = run_with(tmp_path, [penalty], steps=12)
    with open_timeline(tmp_path / "timeline.h5") as f:
        group = f["interventions"]
        names = [n.decode() for n in group["names"][()]]
        steps, values = group["step"][()], group["values"][()]
    assert names == ["intervention/prev/value", "intervention/prev/active", "intervention/prev/grad_norm"]
    assert list(steps) == list(range(12))
    active = values[:, 1]  # (step, member)
    assert (active[4:9] == 1).all() and (active[:4] == 0).all() and (active[9:] == 0).all()
    assert (values[:, 2][active == 0] == 0).all() and (values[6:9, 2] > 0).all()
    assert (values[2:, 0] > 0).all()  # tracked in and out of the window (W_O moves from step 1 on)
    logged = callback.summarize(steps, values)  # what W&B gets: section "intervention"
    assert [row["intervention/prev/active"] for row in logged] == [0.0] * 4 + [1.0] * 5 + [0.0] * 3
    assert logged[6]["intervention/prev/value"] == pytest.approx(float(np.median(values[6, 0])))


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"kind": "penalty", "metric": "mechanism/L0H*/prev_token_score", "weight": 1}, "matches no metric"),
        ({"kind": "penalty", "metric": "model/L0H0/qk1_rank", "weight": 1}, "no useful gradient"),
        ({"kind": "clamp", "component": "L0H9"}, "names no component"),
        ({"kind": "clamp", "component": "L0H1", "members": [5]}, "member 5 does not exist"),
        ({"kind": "clamp", "component": "L0H1", "from_step": 50, "to_step": 40}, "to_step: must be after"),
        ({"kind": "penalty", "metric": "bigram/*/kl", "weight": -1.0}, "promote: true"),
        ({"kind": "penalty", "metric": "bigram/*/kl"}, "weight: a penalty needs a number"),
        ({"kind": "suppress", "component": "L0H1"}, "kind: must be one of penalty, clamp"),
        ({"kind": "clamp", "component": "L0H1", "hold": "ice"}, "hold: must be one of"),
        ({"kind": "clamp", "component": "L0H1", "weight": 2}, "only a penalty has a weight"),
        ({"kind": "clamp", "component": "L0H1", "form_step": 2}, "form_step: unknown field"),
    ],
)
def test_bad_interventions_are_one_line_errors(entry, message):
    language = load_language(SEED_SPEC_PATH)
    cfg = ModelConfig(d_vocab=language.d_vocab, n_ctx=16, n_members=2, n_heads=4, d_model=16, d_head=8)
    with pytest.raises(UsageError, match=message) as error:
        interventions = parse_interventions([entry])
        penalties = PenaltyMetrics(language, cfg, language.sample(8, 16, seed=0).tokens)
        check_against(interventions, cfg, penalties, 100)
    assert "\n" not in str(error.value) and str(error.value).startswith("mechanism.interventions[0]")


def test_a_negative_weight_promotes_when_asked():
    (promoted,) = parse_interventions(
        [{"kind": "penalty", "metric": "bigram/*/kl", "weight": -1.0, "promote": True}]
    )
    assert promoted.weight == -1.0 and promoted.name == "penalty-0"


def test_copy_preference_tells_an_induction_circuit_from_no_previous_token_head():
    """The planted induction model copies: share 1 of the token that followed x. Without its
    previous-token head (W_O of layer 0 zeroed) the induction head's key is empty: exactly 0.5."""
    language = load_language(SEED_SPEC_PATH)
    tokens, copied, other = (torch.from_numpy(a) for a in two_candidate_contexts(language))
    assert len(tokens) > 50 and (copied != other).all()
    names = [language.vocab.tokens[t] for t in tokens[0]]
    assert (
        names[0] == names[4]
        and language.vocab.token_category[tokens[0, 2]] == language.vocab.token_category[tokens[0, 0]]
    )
    model = planted_induction(language)
    assert copy_preference(model, tokens, copied, other).item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        model.W_O[:, 0].zero_()
    assert copy_preference(model, tokens, copied, other).item() == 0.5


def test_a_resumed_run_holds_the_same_frozen_weights_and_equals_the_uninterrupted_one(tmp_path):
    """Stopped at step 6 inside a frozen clamp's window and resumed to 10: the same weights, rows
    and intervention rows as 10 steps straight (the held slices are in the checkpoint, so the
    resume records the same frozen weights)."""
    from devinterp.cli.main import main
    from devinterp.store.timeline import load_timeline
    from tests.conftest import ROOT

    interventions = (
        "[{kind: clamp, component: L0H1, hold: frozen, from_step: 2, to_step: 8}, "
        "{kind: penalty, metric: 'mechanism/L0H*/prev_token_output', weight: 3.0, members: [1]}]"
    )

    def fit(name, steps):
        argv = ["fit", "--config", str(ROOT / "tests" / "data" / "tiny.yaml"), "--run.root", str(tmp_path)]
        argv += ["--run.name", name, "--run.wandb_mode", "disabled", "--trainer.max_steps", str(steps)]
        argv += ["--run.checkpoint_every_n_steps", "3", "--mechanism.interventions", interventions]
        assert main(argv) == 0

    fit("straight", 10)
    fit("stopped", 6)
    assert main(["resume", str(tmp_path / "stopped"), "--trainer.max_steps", "10"]) == 0
    straight, resumed = (load_timeline(tmp_path / n / "timeline.h5") for n in ("straight", "stopped"))
    for group in ("every_step", "interventions"):
        assert np.array_equal(straight.groups[group].steps, resumed.groups[group].steps)
        np.testing.assert_array_equal(straight.groups[group].values, resumed.groups[group].values)
    final = [
        torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=True)
        for n in ("straight", "stopped")
    ]
    for name, value in final[0]["state_dict"].items():
        assert torch.equal(value, final[1]["state_dict"][name]), name
