"""Weight-derived mechanism metrics that can be tracked and penalised: one pure function each.

An intervention (devinterp/interventions.py) penalises a metric by name. The value it tracks
every step (no grad) and the value it adds to the loss (with grad) come from the same function
here, so there is no second implementation. Three families of names qualify:

- ``mechanism/L0H<h>/prev_token_output`` and ``mechanism/L0H<h>/self_output``: the mean
  squared norm of what a layer-0 head writes into the residual stream at position i from
  position i - d (d = 1 and d = 0), averaged over the (position, token, token) triples of a
  fixed sample of the run's own sequences (``offset_write``);
- every headline metric (``<primitive>/<rule>/kl``, devinterp.metrics.weights.HeadlineMetrics);
- every diagnostic (devinterp.metrics.weights.Diagnostics) except ranks and the sign-aware copying
  score, which are piecewise constant in the weights and have no useful gradient.

Why the offset write, not the previous-token *score*, is the one to penalise. The diagnostic
``prev_token`` is |profile(1)| / sum_d |profile(d)|, a share averaged over all token pairs: a
model lowers it by attending more at other offsets, or on token pairs the language never
produces, while its offset-1 attention on the pairs that occur is unchanged. The offset write
has none of those exits. Bilinear attention has no normalisation over positions, so head h's
write at i from i - 1 is exactly pattern_h(i, i - 1) x_{i-1} W_V W_O, and layer 0 reads only
the embeddings (RoPE rotates q and k by the offset alone), so the pattern is a function of the
token pair: the metric is that write's squared norm, averaged with the weights with which the
language produces each adjacent pair. It is zero exactly when no layer-0 head carries anything
from the previous token on any pair the data contains, it is unmoved by attention elsewhere,
and rescaling inside the head (W_Q up, W_V down) leaves the product, hence the metric, as it is.
What it cannot see is a tiny write read by a larger layer-1 key (scale moved across layers);
weight decay works against that, and the composition and induction metrics would show it.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import torch
from torch import Tensor

from devinterp.language import Language
from devinterp.metrics import circuits
from devinterp.metrics.weights import Diagnostics, HeadlineMetrics
from devinterp.model import TensorTransformer

OFFSET_METRICS = {"prev_token_output": 1, "self_output": 0}  # name -> offset d
NOT_DIFFERENTIABLE = ("*_rank", "*/out_rank", "*/copying")  # piecewise constant in the weights


def offset_triples(tokens: np.ndarray, offset: int, by_position: bool) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (query position, query token, key token) triples at ``offset`` in sequences
    ``tokens`` (n, T), and their frequencies (summing to 1): (n_triples, 3) int64, (n_triples,).
    Without ``by_position`` (RoPE, where the pattern depends on the offset alone) the position
    column is 0 and triples differing only in position are merged."""
    T = tokens.shape[1]
    positions = np.broadcast_to(np.arange(offset, T), (tokens.shape[0], T - offset))
    triples = np.stack(
        [positions if by_position else np.zeros_like(positions), tokens[:, offset:], tokens[:, : T - offset]],
        -1,
    ).reshape(-1, 3)
    distinct, counts = np.unique(triples, axis=0, return_counts=True)
    return distinct.astype(np.int64), counts / counts.sum()


def offset_write(model: TensorTransformer, offset: int, triples: Tensor, weights: Tensor) -> Tensor:
    """Mean squared norm of each layer-0 head's write at position i from position i - offset:
    sum over triples (i, b, a) of weight * (pattern_h(b at i, a at i - d))^2 * ||x_a W_V,h W_O,h||^2,
    x the (normed) embedding of the key. triples (n, 3) [query position, query token, key
    token], weights (n,) -> (member, head). Exact for bilinear and squared attention; the tests
    check it against the forward pass's own patterns and values."""
    cfg = model.cfg
    position, query, key = triples.unbind(-1)
    x_query, x_key = model.W_E[:, query], model.W_E[:, key]  # (M, n, D)
    if model.W_pos is not None:
        x_query = x_query + model.W_pos[:, position]
        x_key = x_key + model.W_pos[:, position - offset]
    x_query, x_key = model._norm(x_query), model._norm(x_key)
    q = torch.einsum("mnd,mphde->mphne", x_query, model.W_Q[:, 0])  # (M, P, H, n, dh)
    k = torch.einsum("mnd,mphde->mphne", x_key, model.W_K[:, 0])
    q = circuits._rotate(q, offset, model)  # rope(q, i) . rope(k, i - d) = rope(q, d) . k
    pattern = circuits.combine_pairs((q * k).sum(-1) / cfg.d_head, cfg.attention)  # (M, H, n)
    write = torch.einsum("mnd,mhde,mhef->mhnf", x_key, model.W_V[:, 0], model.W_O[:, 0])  # (M, H, n, D)
    return (weights * pattern.pow(2) * write.pow(2).sum(-1)).sum(-1)


class PenaltyMetrics:
    """The metrics an intervention may name, computed with or without grad by the one function
    that tracks them. ``names`` lists every name; ``values(model, wanted)`` computes only the
    families the wanted names need, (member,) each."""

    def __init__(self, language: Language, cfg, sample_tokens: np.ndarray):
        self.cfg = cfg
        self.headline = HeadlineMetrics(language, cfg.n_ctx)
        self.diagnostics = Diagnostics(language, cfg)
        self.offset_names: list[str] = []
        self._triples: dict[int, tuple[Tensor, Tensor]] = {}
        if cfg.attention != "softmax":  # softmax normalises over positions: no pair function
            by_position = cfg.positions == "learned"
            for offset in sorted(set(OFFSET_METRICS.values())):
                triples, weights = offset_triples(sample_tokens, offset, by_position)
                self._triples[offset] = (torch.from_numpy(triples), torch.from_numpy(weights))
            self.offset_names = [
                f"mechanism/L0H{h}/{metric}" for metric in OFFSET_METRICS for h in range(cfg.n_heads)
            ]
        self.headline_names = [i.name for i in self.headline.infos]
        self.diagnostic_names = [
            i.name
            for i in self.diagnostics.infos
            if not any(fnmatch.fnmatchcase(i.name, p) for p in NOT_DIFFERENTIABLE)
        ]
        self.names = self.offset_names + self.headline_names + self.diagnostic_names

    def match(self, pattern: str) -> list[str]:
        """The names a glob pattern (``*`` within and across ``/``) selects, in order."""
        return [n for n in self.names if fnmatch.fnmatchcase(n, pattern)]

    def why_not(self, pattern: str) -> str:
        """Why a pattern selects nothing, for a one-line error."""
        every = [i.name for i in self.diagnostics.infos]
        if any(fnmatch.fnmatchcase(n, pattern) for n in every):
            return "selects only ranks or copying scores, which have no useful gradient"
        if pattern.startswith("mechanism/") and not self.offset_names:
            return "offset writes need bilinear or squared attention (softmax normalises over positions)"
        known = ", ".join(f"mechanism/L0H*/{m}" for m in OFFSET_METRICS)
        return (
            f"matches no metric of this run (e.g. {known}, a headline <primitive>/<rule>/kl or a diagnostic)"
        )

    def to(self, device: torch.device) -> "PenaltyMetrics":
        self.headline.to(device)
        self.diagnostics.to(device)
        self._triples = {d: (t.to(device), w.to(device)) for d, (t, w) in self._triples.items()}
        return self

    def values(self, model: TensorTransformer, wanted: list[str]) -> dict[str, Tensor]:
        """Every wanted name's value, (member,) each; grad flows where it is enabled."""
        out: dict[str, Tensor] = {}
        wanted_set = set(wanted)
        for metric, offset in OFFSET_METRICS.items():
            heads = [h for h in range(self.cfg.n_heads) if f"mechanism/L0H{h}/{metric}" in wanted_set]
            if heads:
                triples, weights = self._triples[offset]
                written = offset_write(model, offset, triples, weights.to(model.W_E.dtype))  # (M, H)
                out.update({f"mechanism/L0H{h}/{metric}": written[:, h] for h in heads})
        if wanted_set & set(self.headline_names):
            rows = self.headline.compute(model)  # (n_headline, M)
            out.update({n: rows[r] for r, n in enumerate(self.headline_names) if n in wanted_set})
        if wanted_set & set(self.diagnostic_names):
            diagnostics = self.diagnostics.values(model)
            out.update({n: diagnostics[n] for n in self.diagnostic_names if n in wanted_set})
        return {n: out[n] for n in wanted}


def two_candidate_contexts(language: Language) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contexts [x, y1, z, y2, x] that tell copying from a shortcut: x and z eligible for
    induction, y1 != y2 both able to follow x (so both are plausible guesses from x alone), y2
    able to follow z, every step possible under the language and the true next token y1.
    Returns tokens (n, 5), the copied token y1 (n,) and the other candidate y2 (n,); empty
    without an induction primitive.

    A model that copies what followed x's earlier occurrence (an induction circuit through a
    previous-token head) puts y1 above y2. A model that only boosts the tokens in context that
    can follow x (a skip-trigram-like shortcut, query x attending to plausible successors) has
    no reason to prefer y1: over the contexts, where every ordered pair (y1, y2) appears both
    ways round, its share of y1 averages about one half.
    """
    induction = next((p for p in language.primitives if p.kind == "induction"), None)
    empty = np.zeros((0, 5), dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if induction is None:
        return empty
    eligible = np.flatnonzero(induction.eligible)
    after = (
        language.true_next_dist(eligible[:, None])[:, 0] > 0
    )  # (n_eligible, V): a first occurrence's successors
    contexts = []
    for i, x in enumerate(eligible):
        followers = np.flatnonzero(after[i])
        for j, z in enumerate(eligible):
            if z == x:
                continue
            contexts += [
                (x, y1, z, y2, x) for y1 in followers for y2 in followers if y1 != y2 and after[j, y2]
            ]
    if not contexts:
        return empty
    tokens = np.array(contexts, dtype=np.int64)
    dist = language.true_next_dist(tokens)  # (n, 5, V): entry t is p(token t + 1 | tokens <= t)
    rows = np.arange(len(tokens))
    possible = np.all(dist[rows[:, None], np.arange(4), tokens[:, 1:]] > 0, axis=1)
    copies = dist[rows, 4, tokens[:, 1]] > 0.5
    keep = possible & copies
    return tokens[keep], tokens[keep, 1], tokens[keep, 3]


def copy_preference(model: TensorTransformer, tokens: Tensor, copied: Tensor, other: Tensor) -> Tensor:
    """The model's share of the copied token among the two candidates, p(y1) / (p(y1) + p(y2)),
    averaged over the contexts of ``two_candidate_contexts``: (member,). 1 = it copies, about
    0.5 = it cannot tell which candidate followed x. Read from the weights by the exact
    contraction of devinterp.metrics.weights.context_logits."""
    from devinterp.metrics.weights import context_logits

    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    logits = context_logits(model, tokens, positions)  # (M, n, V)
    pair = torch.stack(
        [
            logits.gather(-1, copied.expand(logits.shape[0], -1)[..., None])[..., 0],
            logits.gather(-1, other.expand(logits.shape[0], -1)[..., None])[..., 0],
        ],
        -1,
    )
    return pair.softmax(-1)[..., 0].mean(-1)
