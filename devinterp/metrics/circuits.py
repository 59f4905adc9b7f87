"""Weight-only circuits of a tensor-transformer, batched over members and heads.

Conventions (Elhage et al. 2021, "A mathematical framework for transformer circuits";
weights right-multiply as in model.py):
- E = W_E (member, V, d_model), U = W_U (member, d_model, V); rows of every V x V object are
  the *current* (query / source) token, columns the other one.
- Direct path: E U [current, next].
- QK_r at relative offset d >= 0 (query d positions after key), under RoPE:
  QK_r[a, b] = rope(E_a W_Q,r, d) . (E_b W_K,r) / d_head. The bilinear pattern of a head at
  offset d is QK_1 * QK_2 (Hadamard); the squared variant QK_1 * QK_1.
- OV = E W_V W_O U [source, output].
- Trigram tensor T_h,d[query, key, out] = pattern_h,d[query, key] * OV_h[key, out]; a
  one-layer model's logits are exactly Dir[t_i, c] + sum_h sum_{j <= i} T_h,i-j[t_i, t_j, c],
  because nothing normalises over positions. Signs matter: a negative pattern times a negative
  OV pushes the output up.
Objects are kept factored and gathered by rule indices: nothing here builds a V^3 tensor, and
norms and spectra come from d_head x d_head Gram matrices, not SVDs of V x V products.
"""

from __future__ import annotations

import torch
from torch import Tensor

from devinterp.model import TensorTransformer, apply_rope


def _rotate(x: Tensor, offset: int, model: TensorTransformer) -> Tensor:
    """Rotate the last axis (d_head) of x by RoPE at position ``offset`` (identity without RoPE)."""
    if model.cfg.positions != "rope" or offset == 0:
        return x
    cos, sin = model.rope_cos[offset].to(x.dtype), model.rope_sin[offset].to(x.dtype)
    return apply_rope(x, cos, sin)


def direct_path(model: TensorTransformer) -> Tensor:
    """E U: (member, V, V) [current, next]."""
    return model.W_E @ model.W_U


def query_key_vectors(model: TensorTransformer, layer: int) -> tuple[Tensor, Tensor]:
    """E W_Q and E W_K of every token: each (member, pair, head, V, d_head)."""
    E = model.W_E[:, None, None]  # (M, 1, 1, V, D)
    return E @ model.W_Q[:, layer], E @ model.W_K[:, layer]


def qk(model: TensorTransformer, layer: int, offset: int) -> Tensor:
    """QK_r at relative offset: (member, pair, head, V, V) [query, key], divided by d_head."""
    q, k = query_key_vectors(model, layer)
    return _rotate(q, offset, model) @ k.transpose(-1, -2) / model.cfg.d_head


def combine_pairs(scores: Tensor, attention: str) -> Tensor:
    """Per-pair scores (member, pair, ...) -> pattern entries (member, ...)."""
    if attention == "bilinear":
        return scores[:, 0] * scores[:, 1]
    return scores[:, 0] * scores[:, 0]  # squared (and softmax's raw score, squared: a diagnostic)


def pattern_at_offset(model: TensorTransformer, layer: int, offset: int) -> Tensor:
    """Pattern of every head between every token pair at a relative offset: (member, head, V, V)."""
    return combine_pairs(qk(model, layer, offset), model.cfg.attention)


def ov_factors(model: TensorTransformer, layer: int) -> tuple[Tensor, Tensor]:
    """OV = left @ right: left = E W_V (member, head, V, d_head), right = W_O U (member, head, d_head, V)."""
    return model.W_E[:, None] @ model.W_V[:, layer], model.W_O[:, layer] @ model.W_U[:, None]


def ov(model: TensorTransformer, layer: int) -> Tensor:
    """OV circuit through the unembedding: (member, head, V, V) [source, output]."""
    left, right = ov_factors(model, layer)
    return left @ right


def trigram_entries(
    model: TensorTransformer, layer: int, query: Tensor, key: Tensor, out: Tensor, offsets: list[int]
) -> Tensor:
    """T_h,d[query_i, key_i, out_i] for n gathered triples: (member, head, n, n_offsets)."""
    q, k = query_key_vectors(model, layer)  # (M, P, H, V, dh)
    q, k = q[..., query, :], k[..., key, :]  # (M, P, H, n, dh)
    scores = torch.stack([(_rotate(q, d, model) * k).sum(-1) for d in offsets], -1) / model.cfg.d_head
    pattern = combine_pairs(scores, model.cfg.attention)  # (M, H, n, n_offsets)
    left, right = ov_factors(model, layer)  # (M, H, V, dh), (M, H, dh, V)
    ov_entries = (left[..., key, :] * right[..., out].transpose(-1, -2)).sum(-1)  # (M, H, n)
    return pattern * ov_entries[..., None]


def positional_profile(model: TensorTransformer, layer: int, offsets: list[int]) -> Tensor:
    """How a head's pattern depends on the offset alone: (member, head, n_offsets).

    RoPE: the mean pattern over all (query, key) token pairs at each offset, from d_head x d_head
    Grams: mean_{a,b} (q1_a . k1_b)(q2_a . k2_b) / d_head^2 = <Q1^T Q2, K1^T K2> / (V d_head)^2.
    Learned positions: the pattern between the position embeddings alone, W_pos[i] and
    W_pos[i - d], averaged over i.
    """
    cfg = model.cfg
    second = 1 if cfg.attention == "bilinear" else 0
    if cfg.positions == "learned":
        P = model.W_pos[:, None, None]  # (M, 1, 1, n_ctx, D)
        scores = (P @ model.W_Q[:, layer]) @ (P @ model.W_K[:, layer]).transpose(-1, -2) / cfg.d_head
        pattern = combine_pairs(scores, cfg.attention)  # (M, H, n_ctx, n_ctx) [i, j]
        return torch.stack([pattern.diagonal(-d, dim1=-2, dim2=-1).mean(-1) for d in offsets], -1)
    q, k = query_key_vectors(model, layer)  # (M, P, H, V, dh)
    scale = (q.shape[-2] * cfg.d_head) ** 2
    key_gram = k[:, 0].transpose(-1, -2) @ k[:, second]  # (M, H, dh, dh)
    profile = []
    for d in offsets:
        rotated = _rotate(q, d, model)
        profile.append(
            ((rotated[:, 0].transpose(-1, -2) @ rotated[:, second]) * key_gram).sum((-1, -2)) / scale
        )
    return torch.stack(profile, -1)


def mlp_direct_path(model: TensorTransformer, layer: int) -> Tensor:
    """A bilinear MLP's contribution to the direct path: MLP_layer(E_s) U, (member, V, V)."""
    x = model.W_E[:, None]  # (M, 1, V, D): one batch of V one-token residuals
    return (model.mlp(x, layer) @ model.W_U[:, None])[:, 0]


def head_ov_matrices(model: TensorTransformer, layer: int) -> Tensor:
    """W_V W_O of every head in the residual basis: (member, head, d_model, d_model)."""
    return model.W_V[:, layer] @ model.W_O[:, layer]


def head_qk_matrices(model: TensorTransformer, layer: int) -> Tensor:
    """W_Q,r W_K,r^T in the residual basis (offset 0): (member, pair, head, d_model, d_model)."""
    return model.W_Q[:, layer] @ model.W_K[:, layer].transpose(-1, -2)


def gram(factor: Tensor) -> Tensor:
    """factor^T factor over the last two axes: (..., n, r) -> (..., r, r)."""
    return factor.transpose(-1, -2) @ factor


def factored_norm(left: Tensor, middle: Tensor, right: Tensor) -> Tensor:
    """||left @ middle @ right^T||_F from r x r pieces: tr(G_l X G_r X^T) with G = f^T f.
    left (..., n, r), middle (..., r, s), right (..., m, s) -> (...)."""
    squared = ((gram(left) @ middle @ gram(right)) * middle).sum((-1, -2))
    return squared.clamp_min(0).sqrt()


def composition_scores(product_norm: Tensor, left_norm: Tensor, right_norm: Tensor) -> Tensor:
    """||left right||_F / (||left||_F ||right||_F) (Elhage et al. 2021), 0 where either is zero."""
    scale = left_norm * right_norm
    return torch.where(scale > 0, product_norm / scale.clamp_min(1e-30), torch.zeros_like(product_norm))


def composition(model: TensorTransformer, earlier: int, later: int) -> dict[str, Tensor]:
    """Q-, K- and V-composition of every head of layer ``earlier`` into every head of ``later``:
    each (member, head_earlier, head_later); Q/K scores average the Q/K pairs.

    Head h1 writes y OV1 (OV = W_V W_O); head h2 scores queries x QK2 keys^T (QK = W_Q W_K^T)
    and moves values x OV2. K: keys built by h1, ||QK2 OV1^T||; Q: queries built by h1,
    ||OV1 QK2||; V: ||OV1 OV2||. All norms come from d_head x d_head factors, as in
    TransformerLens's FactoredMatrix, never from d_model x d_model products.
    """
    V1, O1 = (
        model.W_V[:, earlier][:, None, :, None],
        model.W_O[:, earlier][:, None, :, None],
    )  # (M, 1, H1, 1, ., .)
    Q2, K2 = model.W_Q[:, later][:, :, None], model.W_K[:, later][:, :, None]  # (M, P, 1, H2, D, dh)
    V2, O2 = model.W_V[:, later][:, None, None], model.W_O[:, later][:, None, None]  # (M, 1, 1, H2, ., .)
    O1_t = O1.transpose(-1, -2)  # (.., D, dh)
    ov1_norm = factored_norm(V1, torch.eye(V1.shape[-1], device=V1.device, dtype=V1.dtype), O1_t)
    qk2_norm = factored_norm(Q2, torch.eye(Q2.shape[-1], device=Q2.device, dtype=Q2.dtype), K2)
    ov2_norm = factored_norm(
        V2, torch.eye(V2.shape[-1], device=V2.device, dtype=V2.dtype), O2.transpose(-1, -2)
    )
    k_norm = factored_norm(Q2, K2.transpose(-1, -2) @ O1_t, V1)  # Q2 (K2^T O1^T) V1^T
    q_norm = factored_norm(V1, O1 @ Q2, K2)  # V1 (O1 Q2) K2^T
    v_norm = factored_norm(V1, O1 @ V2, O2.transpose(-1, -2))  # V1 (O1 V2) O2
    return {
        "k": composition_scores(k_norm, qk2_norm, ov1_norm).mean(1),  # (M, H1, H2)
        "q": composition_scores(q_norm, ov1_norm, qk2_norm).mean(1),
        "v": composition_scores(v_norm, ov1_norm, ov2_norm)[:, 0],
    }


def pair_composition(model: TensorTransformer, earlier: int, later: int) -> dict[str, Tensor]:
    """Q- and K-composition of every head of layer ``earlier`` into every head of ``later``, per
    Q/K pair r (not averaged as in ``composition``, whose scores are their mean): ``k``, ``q``
    (member, pair, head_earlier, head_later), the same TransformerLens-normalised scores; and
    ``k_signed`` (member, pair, head_earlier, head_later) in [-1, 1]: over the tokens a, the
    alignment of the query of a with the key that h1's write of a produces,
    sum_a (E_a W_Q,r) . (E_a OV1 W_K,r) / (||E W_Q,r||_F ||E OV1 W_K,r||_F). Positive: a key
    carrying a token written by h1 matches the same token's query (as in an induction circuit
    whose first head copies the previous token); negative: it repels it. Bilinear attention
    multiplies the two pairs' patterns, so a negative pair times a negative pair attends too:
    ``k_joint_signed`` = the product over the pairs (member, head_earlier, head_later)."""
    V1, O1 = (
        model.W_V[:, earlier][:, None, :, None],
        model.W_O[:, earlier][:, None, :, None],
    )  # (M, 1, H1, 1, ., .)
    Q2, K2 = model.W_Q[:, later][:, :, None], model.W_K[:, later][:, :, None]  # (M, P, 1, H2, D, dh)
    O1_t = O1.transpose(-1, -2)
    eye = torch.eye(V1.shape[-1], device=V1.device, dtype=V1.dtype)
    ov1_norm = factored_norm(V1, eye, O1_t)
    qk2_norm = factored_norm(Q2, eye, K2)
    k_norm = factored_norm(Q2, K2.transpose(-1, -2) @ O1_t, V1)
    q_norm = factored_norm(V1, O1 @ Q2, K2)
    E = model.W_E[:, None, None, None]  # (M, 1, 1, 1, V, D)
    query = E @ Q2  # (M, P, 1, H2, V, dh)
    written_key = ((E @ V1) @ O1) @ K2  # (M, P, H1, H2, V, dh)
    alignment = (query * written_key).sum((-1, -2))
    scale = query.pow(2).sum((-1, -2)).sqrt() * written_key.pow(2).sum((-1, -2)).sqrt()
    k_signed = torch.where(scale > 0, alignment / scale.clamp_min(1e-30), torch.zeros_like(alignment))
    joint = k_signed[:, 0] * (k_signed[:, 1] if k_signed.shape[1] > 1 else k_signed[:, 0])
    return {
        "k": composition_scores(k_norm, qk2_norm, ov1_norm),
        "q": composition_scores(q_norm, ov1_norm, qk2_norm),
        "k_signed": k_signed,
        "k_joint_signed": joint,
    }


def gram_spectrum(left: Tensor, right: Tensor) -> Tensor:
    """Squared singular values of left @ right^T without forming it: eigenvalues of
    (left^T left)(right^T right). left (..., n, r), right (..., m, r) -> (..., r), descending."""
    gram = (left.transpose(-1, -2) @ left) @ (right.transpose(-1, -2) @ right)
    # LAPACK's eigensolver can crash on NaN or inf (weights of a diverged run): those matrices
    # get NaN eigenvalues without being decomposed, decided on the device (no host sync)
    finite = torch.isfinite(gram).all(-1).all(-1)[..., None]  # (..., 1)
    safe = torch.where(finite[..., None], gram, torch.zeros_like(gram))
    values = torch.linalg.eigvals(safe).real.clamp_min(0).sort(-1, descending=True).values
    return torch.where(finite, values, torch.full_like(values, float("nan")))


def frobenius_and_effective_rank(squared_singular_values: Tensor) -> tuple[Tensor, Tensor]:
    """Frobenius norm and entropy effective rank (Roy & Vetterli 2007) from squared singular
    values (..., r). A zero matrix has norm 0 and effective rank 0 (no NaN)."""
    sigma = squared_singular_values.sqrt()
    total = sigma.sum(-1, keepdim=True)
    p = sigma / total.clamp_min(1e-30)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    rank = torch.where(total[..., 0] > 0, entropy.exp(), torch.zeros_like(entropy))
    return squared_singular_values.sum(-1).sqrt(), rank
