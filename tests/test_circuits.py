"""Factored, weight-only circuits against the plain computation (multiplied out or run forward)."""

import pytest
import torch

from devinterp.metrics import circuits
from devinterp.model import ModelConfig, TensorTransformer


def random_model(n_layers=1, positions="rope", attention="bilinear", mlp=False, seed=0):
    cfg = ModelConfig(
        d_vocab=7,
        n_ctx=10,
        n_members=2,
        n_layers=n_layers,
        n_heads=3,
        d_model=12,
        d_head=4,
        attention=attention,
        positions=positions,
        mlp=mlp,
        d_mlp=6,
    )
    model = TensorTransformer(cfg, seed=seed).double().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 100)
    model.W_O.copy_(torch.randn(model.W_O.shape, generator=g, dtype=torch.float64))
    model.W_U.copy_(torch.randn(model.W_U.shape, generator=g, dtype=torch.float64))
    return model


@pytest.mark.parametrize("attention", ["bilinear", "squared"])
@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_one_layer_logits_are_direct_path_plus_trigram_terms(attention, positions):
    model = random_model(positions=positions, attention=attention)
    if positions == "learned":
        model.W_pos.zero_()  # the trigram decomposition is of token circuits alone
    tokens = torch.randint(0, 7, (1, 8), generator=torch.Generator().manual_seed(1))
    logits = model(tokens.expand(2, 1, -1))[:, 0]  # (M, T, V)
    direct = circuits.direct_path(model)  # (M, V, V)
    V, T = 7, tokens.shape[1]
    every = torch.arange(V)
    for i in range(T):
        expected = direct[:, tokens[0, i]].clone()  # (M, V)
        for j in range(i + 1):
            entries = circuits.trigram_entries(
                model, 0, tokens[0, i].repeat(V), tokens[0, j].repeat(V), every, [i - j]
            )
            expected += entries.sum(1)[..., 0]  # sum over heads
        torch.testing.assert_close(logits[:, i], expected, rtol=1e-9, atol=1e-9)


def test_pattern_at_offset_equals_the_model_pattern():
    model = random_model(n_layers=2)
    for offset in (1, 4):
        table = circuits.pattern_at_offset(model, 1, offset)  # (M, H, V, V)
        for query in range(7):
            for key in range(7):
                x = torch.zeros(2, 1, offset + 1, 12, dtype=torch.float64)
                x[:, 0, 0] += model.W_E[:, key]
                x[:, 0, offset] += model.W_E[:, query]
                pattern = model.attention_pattern(x, 1)[:, 0, :, offset, 0]  # (M, H)
                torch.testing.assert_close(table[:, :, query, key], pattern, rtol=1e-9, atol=1e-12)


def test_ov_and_qk_equal_their_multiplied_out_forms():
    model = random_model(n_layers=2)
    E, U = model.W_E, model.W_U
    ov = circuits.ov(model, 1)
    qk = circuits.qk(model, 1, 0)
    for m in range(2):
        for h in range(3):
            torch.testing.assert_close(ov[m, h], E[m] @ model.W_V[m, 1, h] @ model.W_O[m, 1, h] @ U[m])
            for r in range(2):
                torch.testing.assert_close(
                    qk[m, r, h], E[m] @ model.W_Q[m, 1, r, h] @ model.W_K[m, 1, r, h].T @ E[m].T / 4
                )


def test_composition_from_factors_equals_multiplied_out():
    model = random_model(n_layers=2)
    scores = circuits.composition(model, 0, 1)
    ov1, qk2, ov2 = (
        circuits.head_ov_matrices(model, 0),
        circuits.head_qk_matrices(model, 1),
        circuits.head_ov_matrices(model, 1),
    )
    norm = lambda x: x.flatten(-2).norm(dim=-1)  # noqa: E731
    for m in range(2):
        for a in range(3):
            for b in range(3):
                k = (
                    sum(
                        norm(qk2[m, r, b] @ ov1[m, a].T) / (norm(qk2[m, r, b]) * norm(ov1[m, a]))
                        for r in range(2)
                    )
                    / 2
                )
                q = (
                    sum(
                        norm(ov1[m, a] @ qk2[m, r, b]) / (norm(qk2[m, r, b]) * norm(ov1[m, a]))
                        for r in range(2)
                    )
                    / 2
                )
                v = norm(ov1[m, a] @ ov2[m, b]) / (norm(ov1[m, a]) * norm(ov2[m, b]))
                torch.testing.assert_close(scores["k"][m, a, b], k)
                torch.testing.assert_close(scores["q"][m, a, b], q)
                torch.testing.assert_close(scores["v"][m, a, b], v)
    zero = TensorTransformer(model.cfg, seed=0)  # W_O = 0: no composition, and no NaN
    assert all(torch.equal(s, torch.zeros_like(s)) for s in circuits.composition(zero, 0, 1).values())


def test_gram_spectrum_equals_singular_values_of_the_product():
    g = torch.Generator().manual_seed(0)
    left, right = (
        torch.randn(3, 20, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 15, 4, generator=g, dtype=torch.float64),
    )
    expected = torch.linalg.svdvals(left @ right.transpose(-1, -2))[:, :4] ** 2
    torch.testing.assert_close(circuits.gram_spectrum(left, right), expected)
    norm, rank = circuits.frobenius_and_effective_rank(circuits.gram_spectrum(left, right))
    torch.testing.assert_close(norm, (left @ right.transpose(-1, -2)).flatten(1).norm(dim=1))
    assert ((rank > 1) & (rank <= 4)).all()
    norm0, rank0 = circuits.frobenius_and_effective_rank(torch.zeros(2, 4))
    assert torch.equal(norm0, torch.zeros(2)) and torch.equal(rank0, torch.zeros(2))


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_positional_profile_equals_brute_force(positions):
    model = random_model(n_layers=1, positions=positions)
    offsets = [0, 1, 3]
    profile = circuits.positional_profile(model, 0, offsets)  # (M, H, n)
    for n, d in enumerate(offsets):
        if positions == "rope":
            expected = circuits.pattern_at_offset(model, 0, d).mean((-1, -2))
        else:
            x = model.W_pos[:, None]  # (M, 1, n_ctx, D): positions alone
            pattern = model.attention_pattern(x, 0)[:, 0]  # (M, H, T, T)
            expected = torch.stack([pattern[..., i, i - d] for i in range(d, 10)], -1).mean(-1)
        torch.testing.assert_close(profile[..., n], expected, rtol=1e-9, atol=1e-12)


def test_mlp_direct_path_is_the_mlp_on_each_token():
    model = random_model(mlp=True)
    table = circuits.mlp_direct_path(model, 0)  # (M, V, V)
    for s in range(7):
        x = model.W_E[:, s][:, None, None]  # (M, 1, 1, D)
        torch.testing.assert_close(table[:, s], (model.mlp(x, 0) @ model.W_U[:, None])[:, 0, 0])


def test_gram_spectrum_of_diverged_weights_is_nan_not_a_crash():
    left, right = torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    left[1, 2, 0] = float("nan")
    right[2, 0, 1] = float("inf")
    spectrum = circuits.gram_spectrum(left, right)
    assert torch.isnan(spectrum[1:]).all()
    expected = torch.linalg.svdvals(left[0] @ right[0].T)[:4] ** 2
    torch.testing.assert_close(spectrum[0], expected)
