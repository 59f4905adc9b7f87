import dataclasses
import math

import pytest
import torch

from devinterp.model import ModelConfig, TensorTransformer

VARIANTS = [(a, p) for a in ("bilinear", "squared", "softmax") for p in ("rope", "learned")]


def make_model(attention="bilinear", positions="rope", mlp=False, n_members=2, seed=0, norm=False):
    cfg = ModelConfig(
        d_vocab=11,
        n_ctx=16,
        n_members=n_members,
        n_layers=2,
        n_heads=3,
        d_model=12,
        d_head=4,
        attention=attention,
        positions=positions,
        mlp=mlp,
        d_mlp=10,
        norm=norm,
    )
    model = TensorTransformer(cfg, seed=seed)
    with torch.no_grad():  # W_O and W_U start at zero; make every path live for these checks
        g = torch.Generator().manual_seed(123)
        model.W_O.normal_(0, 0.5, generator=g)
        model.W_U.normal_(0, 0.5, generator=g)
    return model


def test_initial_logits_are_exactly_zero():
    cfg = ModelConfig(d_vocab=11, n_ctx=16, n_members=3)
    model = TensorTransformer(cfg, seed=0)
    tokens = torch.randint(0, 11, (3, 2, 16))
    assert torch.equal(model(tokens), torch.zeros(3, 2, 16, 11))
    assert model.W_O.abs().sum() == 0 and model.W_U.abs().sum() == 0 and model.W_Q.abs().sum() > 0


@pytest.mark.parametrize("attention,positions", VARIANTS)
@pytest.mark.parametrize("mlp", [False, True])
def test_model_is_causal(attention, positions, mlp):
    model = make_model(attention, positions, mlp)
    tokens = torch.randint(0, 11, (2, 3, 16), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, :, 9] = (changed[:, :, 9] + 1) % 11
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :, :9], after[:, :, :9], rtol=0, atol=0)
    assert not torch.allclose(before[:, :, 9:], after[:, :, 9:])


def explicit_rotation(position: int, d_head: int, base: float = 10000.0) -> torch.Tensor:
    """Block-diagonal rotation matrix R(position), acting on row vectors as v @ R."""
    R = torch.zeros(d_head, d_head, dtype=torch.float64)
    for k in range(d_head // 2):
        angle = position * base ** (-2 * k / d_head)
        c, s = math.cos(angle), math.sin(angle)
        R[2 * k, 2 * k], R[2 * k, 2 * k + 1] = c, s
        R[2 * k + 1, 2 * k], R[2 * k + 1, 2 * k + 1] = -s, c
    return R


def test_bilinear_pattern_equals_explicit_formula():
    model = make_model("bilinear", "rope").double().requires_grad_(False)
    x = torch.randn(2, 2, 7, 12, dtype=torch.float64)  # (member, batch, pos, d_model)
    pattern = model.attention_pattern(x, layer=1)  # (M, B, H, T, T)
    d_head = 4
    for m in range(2):
        for b in range(2):
            for h in range(3):
                for i in range(7):
                    for j in range(7):
                        scores = []
                        for r in range(2):
                            q = x[m, b, i] @ model.W_Q[m, 1, r, h].double() @ explicit_rotation(i, d_head)
                            k = x[m, b, j] @ model.W_K[m, 1, r, h].double() @ explicit_rotation(j, d_head)
                            scores.append((q @ k).item() / d_head)
                        expected = scores[0] * scores[1] if j <= i else 0.0
                        assert pattern[m, b, h, i, j].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def pattern_between(model, u, w, i, j):
    """Layer-0 pattern from position i to j of a residual stream that is zero except u at i and w at j."""
    x = torch.zeros(2, 1, 16, 12, dtype=torch.float64)
    x[:, 0, i], x[:, 0, j] = u, w
    return model.attention_pattern(x, 0)[:, 0, :, i, j]  # (member, head)


@pytest.mark.parametrize("attention", ["bilinear", "squared"])
def test_rope_pattern_depends_on_relative_position_only(attention):
    model = make_model(attention, "rope").double()
    u, w = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    reference = pattern_between(model, u, w, 3, 1)
    for shift in (1, 5, 12):
        torch.testing.assert_close(
            pattern_between(model, u, w, 3 + shift, 1 + shift), reference, rtol=1e-9, atol=1e-12
        )
    assert not torch.allclose(pattern_between(model, u, w, 4, 1), reference)  # offset matters


def test_learned_positions_depend_on_absolute_position():
    model = make_model("bilinear", "learned").double()
    tokens = torch.tensor([[[1, 2, 3, 1, 2, 3, 1, 2, 3]]]).expand(2, 1, -1)
    pattern = model.attention_pattern(model.embed(tokens), 0)  # (M, B, H, T, T)
    # the same token pair (3 attending to the 2 before it) at two absolute places differs
    assert not torch.allclose(pattern[:, 0, :, 3, 2], pattern[:, 0, :, 6, 5])


def test_members_are_independent_models():
    ensemble = make_model(n_members=3, seed=10)
    tokens = torch.randint(0, 11, (3, 2, 16))
    logits = ensemble(tokens)
    for k in range(3):
        alone = TensorTransformer(ModelConfig(**{**ensemble.cfg.__dict__, "n_members": 1}), seed=10 + k)
        with torch.no_grad():
            alone.W_O.copy_(ensemble.W_O[k : k + 1])
            alone.W_U.copy_(ensemble.W_U[k : k + 1])
        torch.testing.assert_close(alone.W_Q[0], ensemble.W_Q[k], rtol=0, atol=0)
        torch.testing.assert_close(alone(tokens[k : k + 1])[0], logits[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention,positions", [("bilinear", "rope"), ("softmax", "learned")])
@pytest.mark.parametrize("per_pass", [1, 2, 3])
def test_a_forward_in_passes_of_members_is_the_forward_with_its_gradients(attention, positions, per_pass):
    """5 members in passes of 1, 2 (3, 2 after evening out) or 3: the same logits and the same
    gradient for every weight as one pass over all."""
    model = make_model(attention, positions, mlp=True, n_members=5).double()  # float32 sums differ in order
    tokens = torch.randint(11, (5, 3, 9), generator=torch.Generator().manual_seed(0))
    whole = model(tokens)
    grads = torch.autograd.grad(whole.square().sum(), list(model.parameters()))
    parts = model.in_passes(tokens, per_pass)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(parts.square().sum(), list(model.parameters())), grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_bilinear_mlp_is_the_elementwise_product_of_two_linear_maps():
    model = make_model(mlp=True)
    x = torch.randn(2, 1, 5, 12)
    expected = ((x @ model.W_in[:, None, 0]) * (x @ model.W_gate[:, None, 0])) @ model.W_out[:, None, 0]
    torch.testing.assert_close(model.mlp(x, 0), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["bilinear", "squared"])
@pytest.mark.parametrize("seq_len,chunk", [(16, 64), (100, 32), (512, 64)])
def test_linear_attention_path_equals_the_quadratic_one(attention, seq_len, chunk):
    """Chunked linear attention (d_head^2 features) computes the same function as the T x T
    pattern, with RoPE, for outputs and gradients."""
    cfg = ModelConfig(
        d_vocab=12,
        n_ctx=512,
        n_members=2,
        n_layers=2,
        n_heads=2,
        d_model=16,
        d_head=8,
        attention=attention,
        positions="rope",
        attention_path="quadratic",
        linear_chunk=chunk,
    )
    model = TensorTransformer(cfg, seed=3).double()
    with torch.no_grad():
        model.W_O.normal_(0, 0.3)
        model.W_U.normal_(0, 0.3)
    tokens = torch.randint(0, 12, (2, 2, seq_len), generator=torch.Generator().manual_seed(0))
    outputs, grads = {}, {}
    for path in ("quadratic", "linear"):
        model.cfg = dataclasses.replace(cfg, attention_path=path)
        model.zero_grad()
        logits = model(tokens)
        logits.square().mean().backward()
        outputs[path], grads[path] = logits.detach(), model.W_Q.grad.clone()
    torch.testing.assert_close(outputs["linear"], outputs["quadratic"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads["linear"], grads["quadratic"], rtol=1e-9, atol=1e-9)


def test_linear_path_with_given_positions_and_in_float32():
    cfg = ModelConfig(
        d_vocab=12,
        n_ctx=64,
        n_members=1,
        n_layers=1,
        n_heads=2,
        d_model=16,
        d_head=8,
        attention_path="linear",
        linear_chunk=8,
    )
    model = TensorTransformer(cfg, seed=1)
    with torch.no_grad():
        model.W_O.normal_(0, 0.3)
    x = torch.randn(1, 3, 20, 16, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(20) * 2 + 5  # a context placed later in the sequence
    linear = model.attention(x, 0, positions)
    model.cfg = dataclasses.replace(cfg, attention_path="quadratic")
    torch.testing.assert_close(linear, model.attention(x, 0, positions), rtol=1e-4, atol=1e-5)


def test_auto_path_takes_the_linear_scan_only_for_long_sequences():
    cfg = ModelConfig(d_vocab=33, n_ctx=4096, n_heads=4, d_model=64, d_head=16)  # the quickstart's heads
    assert not cfg.uses_linear_path(64) and not cfg.uses_linear_path(128)
    assert cfg.uses_linear_path(512) and cfg.uses_linear_path(2048)
    assert not dataclasses.replace(cfg, attention="softmax").uses_linear_path(2048)
    assert dataclasses.replace(cfg, attention_path="linear").uses_linear_path(16)
    assert not dataclasses.replace(cfg, attention_path="quadratic").uses_linear_path(4096)
