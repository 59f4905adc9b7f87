"""The tensor-transformer: an ensemble of small attention(-and-bilinear-MLP) models in one module.

Conventions, stated once:
- Weights are named as in TransformerLens and right-multiply: ``x @ W``.
- Every parameter has a leading member axis: member k is an independent model with its own
  initialisation (generator seeded with ``seed + k``). Nothing couples members.
- Bilinear attention (Pearce et al. 2024, "Bilinear MLPs enable weight-based mechanistic
  interpretability", arXiv 2410.08417, and its attention analogue), per
  head, causal: score_r(i, j) = (q_r,i . k_r,j) / d_head for the Q/K pairs r = 1, 2, and
  pattern(i, j) = score_1 * score_2 for j <= i, else 0. No softmax and no normalisation over
  positions, so patterns are signed and rows need not sum to one. ``attention="squared"`` is the
  one-pair variant score^2; ``attention="softmax"`` is the usual softmax(q.k / sqrt(d_head)).
- Positions: RoPE on q and k (the default, as in the reference toy models) or learned absolute
  position embeddings W_pos added to the token embedding.
- Bilinear MLP: ((x W_in) * (x W_gate)) W_out.
- Initialisation as in the reference models: W_E ~ N(0, 1) (an embedding's default), W_Q, W_K,
  W_V, W_in, W_gate, W_out ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (a linear layer's default), and
  W_O = W_U = 0, so the direct path, OV and the logits are exactly zero at step 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from devinterp.errors import UsageError, at_least, one_of

Attention = Literal["bilinear", "squared", "softmax"]
Positions = Literal["rope", "learned"]
AttentionPath = Literal["auto", "quadratic", "linear"]

# the axes of every parameter, as the timeline's snapshot datasets name them
PARAMETER_AXES: dict[str, str] = {
    "W_E": "member, vocab, d_model",
    "W_Q": "member, layer, pair, head, d_model, d_head",
    "W_K": "member, layer, pair, head, d_model, d_head",
    "W_V": "member, layer, head, d_model, d_head",
    "W_O": "member, layer, head, d_head, d_model",
    "W_U": "member, d_model, vocab",
    "W_pos": "member, position, d_model",
    "W_in": "member, layer, d_model, d_mlp",
    "W_gate": "member, layer, d_model, d_mlp",
    "W_out": "member, layer, d_mlp, d_model",
}


@dataclass(frozen=True)
class ModelConfig:
    d_vocab: int
    n_ctx: int  # longest sequence the model sees (learned positions need it)
    n_members: int = 1
    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    d_head: int = 16
    attention: Attention = "bilinear"
    positions: Positions = "rope"
    mlp: bool = False
    d_mlp: int = 256
    norm: bool = False  # parameter-free RMSNorm before attention, MLP and unembedding
    rope_base: float = 10000.0
    attention_path: AttentionPath = "auto"  # quadratic (T x T patterns) or linear (chunked scan)
    linear_chunk: int = 64  # positions per chunk of the linear path

    @property
    def n_pairs(self) -> int:
        """Q/K pairs per head: two for bilinear attention, one otherwise."""
        return 2 if self.attention == "bilinear" else 1

    def __post_init__(self):
        one_of(self.attention, ("bilinear", "squared", "softmax"), "model.attention")
        one_of(self.positions, ("rope", "learned"), "model.positions")
        for field in ("d_vocab", "n_ctx", "n_members", "n_layers", "n_heads", "d_model", "d_head", "d_mlp"):
            at_least(getattr(self, field), 1, f"model.{field}")
        if self.positions == "rope" and self.d_head % 2:
            raise UsageError(f"model.d_head: RoPE needs an even d_head, got {self.d_head}")
        one_of(self.attention_path, ("auto", "quadratic", "linear"), "model.attention_path")
        at_least(self.linear_chunk, 1, "model.linear_chunk")
        if self.attention_path == "linear" and self.attention == "softmax":
            raise UsageError(
                "model.attention_path: softmax attention has no linear path; use auto or quadratic"
            )

    def uses_linear_path(self, seq_len: int) -> bool:
        """Whether attention over ``seq_len`` positions takes the chunked linear path. ``auto``
        compares costs per position per head: the quadratic path's T (P + 1) d_head (P score
        products and the pattern times values) against the linear path's C (P + 1) d_head within
        a chunk of C plus 4 d_head^2 (d_head + 1) for the d_head^2 features and their state (the
        4, not the 2 multiply-adds count, is calibrated by bench/attention_paths.py: for
        d_head 16 the linear path wins from T = 512 on, the quadratic one up to T = 256)."""
        if self.attention == "softmax" or self.attention_path == "quadratic":
            return False
        if self.attention_path == "linear":
            return True
        P, dh, C = self.n_pairs, self.d_head, self.linear_chunk
        quadratic = seq_len * (P + 1) * dh
        linear = min(C, seq_len) * (P + 1) * dh + 4 * dh * dh * (dh + 1)
        return linear < quadratic


def rope_angles(n_ctx: int, d_head: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each (n_ctx, d_head // 2), in float64 (cast at use)."""
    inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
    angles = torch.arange(n_ctx, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def even_passes(n: int, per_pass: int | None) -> list[slice]:
    """Slices of ``range(n)`` of about equal size, at most ``per_pass`` each (None: one slice)."""
    if per_pass is None or per_pass >= n:
        return [slice(0, n)]
    count = math.ceil(n / max(1, per_pass))
    size = math.ceil(n / count)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def members_per_pass(n_heads: int, batch_size: int, seq_len: int, budget_bytes: int) -> int:
    """How many members (or LLC chain copies) one pass takes on a CPU: as many as keep one
    layer's attention scores (member, batch, head, pos, pos) in float32 within ``budget_bytes``,
    at least one. The callers' budgets are measured (devinterp.module, devinterp.llc.snapshots)."""
    return max(1, budget_bytes // (batch_size * n_heads * seq_len**2 * 4))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x_2i, x_2i+1) of the last axis by position. x (..., pos, d_head).

    The pair is read as the complex number x_2i + i x_2i+1 and multiplied by exp(i angle),
    which costs one complex product instead of slicing and re-stacking halves.
    """
    if torch.compiler.is_compiling():  # the compiler generates no code for complex numbers
        even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)


def chunked_linear_attention(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor, chunk: int) -> Tensor:
    """z_t = sum_{s <= t} (q1_t . k1_s)(q2_t . k2_s) v_s, without a T x T pattern.

    Bilinear attention is causal linear attention with the feature map phi(a, b) = a (x) b
    (outer product, d_head^2 features): (q1 . k1)(q2 . k2) = phi(q1, q2) . phi(k1, k2). Positions
    are split into chunks of ``chunk``; within a chunk the pattern is formed directly (C x C);
    the past reaches a chunk through the state S_c = sum over earlier chunks of phi(k1, k2)^T v
    (d_head^2 x d_v), an exclusive prefix sum over chunks. Memory is O(T d_head^2 + (T / C)
    d_head^3), never O(T^2); one batched product per step instead of a loop over chunks (5x
    faster here at T = 2048). Squared attention is the case q2 = q1, k2 = k1. All inputs
    (..., T, d); returns (..., T, d_v).
    """
    T = v.shape[-2]
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        q1, k1, q2, k2, v = (F.pad(t, (0, 0, 0, pad)) for t in (q1, k1, q2, k2, v))
    q1, k1, q2, k2, v = (t.unflatten(-2, (n, chunk)) for t in (q1, k1, q2, k2, v))  # (..., n, C, d)
    within = ((q1 @ k1.transpose(-1, -2)) * (q2 @ k2.transpose(-1, -2))).tril() @ v  # (..., n, C, d_v)
    phi_q = (q1[..., :, None] * q2[..., None, :]).flatten(-2)  # (..., n, C, d_head^2)
    phi_k = (k1[..., :, None] * k2[..., None, :]).flatten(-2)
    per_chunk = phi_k.transpose(-1, -2) @ v  # (..., n, d_head^2, d_v)
    state = per_chunk.cumsum(-3) - per_chunk  # what every earlier chunk left: exclusive prefix sum
    z = within + phi_q @ state
    return z.flatten(-3, -2)[..., :T, :]


def rms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class TensorTransformer(nn.Module):
    """An ensemble of ``n_members`` tensor-transformers evaluated in lockstep."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self._twins: dict[int, TensorTransformer] = {}  # by member count (``twin``)
        self.cfg = cfg
        M, L, P, H = cfg.n_members, cfg.n_layers, cfg.n_pairs, cfg.n_heads
        D, dh, V, F = cfg.d_model, cfg.d_head, cfg.d_vocab, cfg.d_mlp
        empty = lambda *shape: nn.Parameter(torch.empty(*shape))  # noqa: E731
        self.W_E = empty(M, V, D)
        self.W_Q = empty(M, L, P, H, D, dh)
        self.W_K = empty(M, L, P, H, D, dh)
        self.W_V = empty(M, L, H, D, dh)
        self.W_O = empty(M, L, H, dh, D)
        self.W_U = empty(M, D, V)
        self.W_pos = empty(M, cfg.n_ctx, D) if cfg.positions == "learned" else None
        if cfg.mlp:
            self.W_in = empty(M, L, D, F)
            self.W_gate = empty(M, L, D, F)
            self.W_out = empty(M, L, F, D)
        if cfg.positions == "rope":
            cos, sin = rope_angles(cfg.n_ctx, dh, cfg.rope_base)
            # float64, cast to the activations' dtype at use, so a float64 model is exact
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """Member k from its own generator (seed + k), independent of how many members exist."""
        cfg = self.cfg
        with torch.no_grad():
            for k in range(cfg.n_members):
                g = torch.Generator().manual_seed(seed + k)
                self.W_E[k].normal_(0.0, 1.0, generator=g)
                for W in (self.W_Q, self.W_K, self.W_V):
                    W[k].uniform_(-1, 1, generator=g).mul_(cfg.d_model**-0.5)
                self.W_O[k].zero_()
                self.W_U[k].zero_()
                if self.W_pos is not None:
                    self.W_pos[k].normal_(0.0, 0.02, generator=g)
                if cfg.mlp:
                    for W in (self.W_in, self.W_gate):
                        W[k].uniform_(-1, 1, generator=g).mul_(cfg.d_model**-0.5)
                    self.W_out[k].uniform_(-1, 1, generator=g).mul_(cfg.d_mlp**-0.5)

    # ---- pieces ----------------------------------------------------------------------------

    def queries_keys(self, x: Tensor, layer: int, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Rotated queries and keys. x (member, batch, pos, d_model) -> q, k (member, pair,
        batch, head, pos, d_head); q is divided by d_head for bilinear and squared attention.

        ``positions`` (pos,) or (batch, pos), increasing along pos, gives each row's absolute
        position (default 0..T-1), so a context whose empty positions are left out (circuits.py)
        rotates as the full one.
        """
        cfg = self.cfg
        T = x.shape[2]
        q = torch.einsum("mbtd,mphde->mpbhte", x, self.W_Q[:, layer])  # (M, P, B, H, T, dh)
        k = torch.einsum("mbtd,mphde->mpbhte", x, self.W_K[:, layer])
        if cfg.positions == "rope":
            if positions is None:
                cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, dh/2)
            else:  # (T, dh/2) or (B, 1, T, dh/2), broadcasting over heads
                cos, sin = self.rope_cos[positions], self.rope_sin[positions]
                if positions.dim() == 2:
                    cos, sin = cos[:, None], sin[:, None]
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cfg.attention != "softmax":
            q = q / cfg.d_head  # scale q (T x d_head) rather than the scores (T x T)
        return q, k

    def attention_pattern(self, x: Tensor, layer: int, positions: Tensor | None = None) -> Tensor:
        """Causal pattern per head. x (member, batch, pos, d_model) -> (member, batch, head, pos, pos)."""
        cfg = self.cfg
        T = x.shape[2]
        q, k = self.queries_keys(x, layer, positions)
        if cfg.attention == "softmax":
            scores = (q[:, 0] @ k[:, 0].transpose(-1, -2)) / math.sqrt(cfg.d_head)  # (M, B, H, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            return scores.masked_fill(~causal, float("-inf")).softmax(-1)
        # unbind, not index, the pairs so the backward pass allocates no zero-filled copies of
        # the full score tensor
        q_pairs, k_pairs = q.unbind(1), k.unbind(1)
        first = q_pairs[0] @ k_pairs[0].transpose(-1, -2)  # (M, B, H, T, T)
        if cfg.attention == "bilinear":
            pattern = first * (q_pairs[1] @ k_pairs[1].transpose(-1, -2))
        else:
            pattern = first * first
        return pattern.tril()

    def attention(
        self, x: Tensor, layer: int, positions: Tensor | None = None, pattern: Tensor | None = None
    ) -> Tensor:
        """One attention layer's output. x (member, batch, pos, d_model) -> same shape. Takes
        the chunked linear path when ``cfg.uses_linear_path(pos)`` (equal to float tolerance),
        unless the layer's ``pattern`` (member, batch, head, pos, pos) is given."""
        cfg = self.cfg
        v = torch.einsum("mbtd,mhde->mbhte", x, self.W_V[:, layer])  # (M, B, H, T, dh)
        if pattern is not None:
            z = pattern @ v
        elif cfg.uses_linear_path(x.shape[2]):
            q, k = self.queries_keys(x, layer, positions)  # (M, P, B, H, T, dh)
            q_pairs, k_pairs = q.unbind(1), k.unbind(1)
            q2, k2 = (q_pairs[1], k_pairs[1]) if cfg.attention == "bilinear" else (q_pairs[0], k_pairs[0])
            z = chunked_linear_attention(q_pairs[0], k_pairs[0], q2, k2, v, cfg.linear_chunk)
        else:
            z = self.attention_pattern(x, layer, positions) @ v  # (M, B, H, T, dh)
        return torch.einsum("mbhte,mhed->mbtd", z, self.W_O[:, layer])

    def mlp(self, x: Tensor, layer: int) -> Tensor:
        """Bilinear MLP. x (member, batch, pos, d_model) -> same shape."""
        left = torch.einsum("mbtd,mdf->mbtf", x, self.W_in[:, layer])
        right = torch.einsum("mbtd,mdf->mbtf", x, self.W_gate[:, layer])
        return torch.einsum("mbtf,mfd->mbtd", left * right, self.W_out[:, layer])

    def embed(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """tokens (member, batch, pos) -> residual stream (member, batch, pos, d_model)."""
        M, _, T = tokens.shape
        assert M == self.cfg.n_members, f"expected {self.cfg.n_members} members, got {M}"
        assert T <= self.cfg.n_ctx, f"sequence of {T} tokens exceeds n_ctx {self.cfg.n_ctx}"
        member = torch.arange(M, device=tokens.device)[:, None, None]
        x = self.W_E[member, tokens]
        if self.W_pos is not None:
            if positions is None:
                x = x + self.W_pos[:, None, :T]
            else:  # (pos,) -> (M, 1, T, D); (batch, pos) -> (M, B, T, D)
                x = x + (self.W_pos[:, None, positions] if positions.dim() == 1 else self.W_pos[:, positions])
        return x

    def _norm(self, x: Tensor) -> Tensor:
        return rms_norm(x) if self.cfg.norm else x

    def blocks(
        self, x: Tensor, positions: Tensor | None = None, patterns: list[Tensor] | None = None
    ) -> Tensor:
        """Residual stream after every layer. x (member, batch, pos, d_model) -> same shape.
        Given a list, ``patterns`` receives every layer's attention pattern (member, batch,
        head, pos, pos), and attention takes the quadratic path."""
        for layer in range(self.cfg.n_layers):
            normed = self._norm(x)
            pattern = None
            if patterns is not None:
                pattern = self.attention_pattern(normed, layer, positions)
                patterns.append(pattern)
            x = x + self.attention(normed, layer, positions, pattern)
            if self.cfg.mlp:
                x = x + self.mlp(self._norm(x), layer)
        return x

    def unembed(self, x: Tensor) -> Tensor:
        """(member, batch, pos, d_model) -> logits (member, batch, pos, d_vocab)."""
        return torch.einsum("mbtd,mdv->mbtv", self._norm(x), self.W_U)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (member, batch, pos) int -> logits (member, batch, pos, d_vocab)."""
        return self.unembed(self.blocks(self.embed(tokens)))

    def in_passes(self, tokens: Tensor, members_per_pass: int) -> Tensor:
        """``forward(tokens)`` computed for about ``members_per_pass`` members at a time (the
        same function: members are independent), each pass through a twin of this model holding
        that pass's slices of the weights (gradients reach the weights through the slices). On a
        CPU a pass whose attention scores fit the cache is faster per member than one pass over
        all (``members_per_pass``)."""
        passes = even_passes(tokens.shape[0], members_per_pass)
        if len(passes) == 1:
            return self(tokens)
        params, buffers = dict(self.named_parameters()), dict(self.named_buffers())
        logits = []
        for members in passes:
            part = {name: value[members] for name, value in params.items()}
            twin = self.twin(members.stop - members.start)
            logits.append(torch.func.functional_call(twin, {**part, **buffers}, (tokens[members],)))
        return torch.cat(logits)

    def twin(self, n_members: int) -> TensorTransformer:
        """A model of this architecture with ``n_members`` members on this model's device (this
        model itself for its own count), made once per count: the module that
        ``torch.func.functional_call`` runs with other weights (passes, LLC chain copies)."""
        if n_members == self.cfg.n_members:
            return self
        if n_members not in self._twins:
            twin = TensorTransformer(ModelConfig(**{**self.cfg.__dict__, "n_members": n_members}))
            self._twins[n_members] = twin.to(self.W_E.device)
        return self._twins[n_members]

    def run_with_patterns(self, tokens: Tensor) -> tuple[Tensor, list[Tensor]]:
        """tokens (member, batch, pos) -> logits and every layer's attention pattern
        [(member, batch, head, pos, pos)] * n_layers, in one forward pass."""
        patterns: list[Tensor] = []
        return self.unembed(self.blocks(self.embed(tokens), patterns=patterns)), patterns
