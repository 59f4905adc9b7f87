"""Hand-built tensor-transformers that implement one rule of a language exactly.

Each uses learned positions (so position handling is explicit), one-hot token embeddings and
disjoint residual subspaces, so what a head reads and writes is plain to see.
"""

from __future__ import annotations

import numpy as np
import torch

from devinterp.language import Language
from devinterp.model import ModelConfig, TensorTransformer

LOGIT_SCALE = 25.0  # large enough that softmax(scale * onehot) is nearly the onehot


def _model(language: Language, n_layers: int, d_model: int, d_head: int, n_ctx: int) -> TensorTransformer:
    cfg = ModelConfig(
        d_vocab=language.d_vocab,
        n_ctx=n_ctx,
        n_members=1,
        n_layers=n_layers,
        n_heads=2,
        d_model=d_model,
        d_head=d_head,
        attention="bilinear",
        positions="learned",
    )
    model = TensorTransformer(cfg, seed=0).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def planted_bigram(language: Language, n_ctx: int = 16) -> TensorTransformer:
    """Direct path only: E = I, U = log of the bigram table (uniform rows elsewhere)."""
    V = language.d_vocab
    model = _model(language, 1, V, 2, n_ctx)
    bigram = next(p for p in language.primitives if p.kind == "bigram")
    with torch.no_grad():
        model.W_E[0] = torch.eye(V)
        for s in bigram.sources:
            model.W_U[0, s] = torch.from_numpy(np.log(bigram.table[s] + 1e-12))
    return model


def planted_skip_trigram(language: Language, n_ctx: int = 16) -> TensorTransformer:
    """One head: trigger B_r queries direction r, anchor A_r keys it (pattern 1 at any offset);
    the value of A_r writes C_r into an output subspace that the unembedding reads."""
    V = language.d_vocab
    skip = next(p for p in language.primitives if p.kind == "skip_trigram")
    R = len(skip.rules)
    d_head = R
    model = _model(language, 1, 2 * V, d_head, n_ctx)  # residual: [tokens | outputs]
    root = d_head**0.5
    with torch.no_grad():
        model.W_E[0, :, :V] = torch.eye(V)
        for r, (a, b, c) in enumerate(skip.rules.tolist()):
            for pair in range(2):
                model.W_Q[0, 0, pair, 0, b, r] = root
                model.W_K[0, 0, pair, 0, a, r] = root
            model.W_V[0, 0, 0, a, r] = 1.0
            model.W_O[0, 0, 0, r, V + c] = 1.0
        model.W_U[0, V:, :] = LOGIT_SCALE * torch.eye(V)
    return model


def planted_induction(language: Language, n_ctx: int = 8) -> TensorTransformer:
    """Layer 0 head 0: previous-token head (positions i -> i - 1) copying the token into a
    'previous token' subspace. Layer 1 head 0: query = current token, key = previous token,
    value = token, written to an output subspace the unembedding reads."""
    V = language.d_vocab
    tok, prev, pos, out = 0, V, 2 * V, 2 * V + n_ctx  # residual subspace offsets
    d_head = max(V, n_ctx)
    model = _model(language, 2, 3 * V + n_ctx, d_head, n_ctx)
    root = d_head**0.5
    with torch.no_grad():
        model.W_E[0, :, tok : tok + V] = torch.eye(V)
        model.W_pos[0, :, pos : pos + n_ctx] = torch.eye(n_ctx)
        for pair in range(2):
            for i in range(n_ctx):
                model.W_Q[0, 0, pair, 0, pos + i, i] = root
                if i + 1 < n_ctx:
                    model.W_K[0, 0, pair, 0, pos + i, i + 1] = root
            for x in range(V):
                model.W_Q[0, 1, pair, 0, tok + x, x] = root
                model.W_K[0, 1, pair, 0, prev + x, x] = root
        for x in range(V):
            model.W_V[0, 0, 0, tok + x, x] = 1.0
            model.W_O[0, 0, 0, x, prev + x] = 1.0
            model.W_V[0, 1, 0, tok + x, x] = 1.0
            model.W_O[0, 1, 0, x, out + x] = 1.0
        model.W_U[0, out : out + V, :] = LOGIT_SCALE * torch.eye(V)
    return model
