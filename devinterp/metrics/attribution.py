"""Exact attribution of a rule's logit to the model's components, from the weights alone.

Conventions, stated once (Elhage et al. 2021 for the residual-stream view):
- What is split: the *centred* logit read along a distribution r over the vocabulary,
  sum_c r_c (logit_c - mean_v logit_v), at the last position of a sparse context (the rule's
  minimal context, as devinterp.metrics.weights.context_logits builds it). For a table rule r is the
  rule's true next-token distribution, so the quantity is the expected centred logit of its
  output. Log-probabilities do not split additively; centred logits do. Category-level rules
  are left out (a category's logit is not a logit).
- Components: the direct path (the embedding read by the unembedding), every head of every
  layer. Their parts sum to the centred logit exactly: the residual stream at the last position
  is the embedding plus every head's output, and the unembedding is linear.
- Inside a head of layer l >= 1, the *sources* are what its inputs are made of: the embedding
  and the total output of every head of earlier layers. Bilinear attention makes a head's
  output a polynomial of degree 5 in its input (q1, q2 at the query; k1, k2, v at the key), so
  it expands into finitely many terms, each reading a set of sources. Each term is shared
  equally among the distinct sources it reads. That is the Shapley value of the game
  v(B) = the head's output when only the sources in B feed it: the terms reading exactly the set
  A sum to the Harsanyi dividend F(A) = sum_{B in A} (-1)^(|A| - |B|) v(B), and Shapley's
  value of source s is sum_{A containing s} F(A) / |A|. So it is computed from the 2^S
  evaluations v(B) (S sources), never from the 5^S expanded terms, and the shares of a head
  sum to its part by construction.
- Exact for attention-only models without norm and with bilinear or squared attention: a norm
  or a softmax makes the output no polynomial, and a bilinear MLP is not a head (both refused).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from devinterp.metrics.circuits import combine_pairs
from devinterp.model import TensorTransformer


@dataclass
class LogitParts:
    """A split of the centred logit, per member and context. ``heads`` (member, n, layer, head);
    ``sources`` (member, n, layer, head, source): layer 0 has the embedding as its one source;
    ``source_names`` names the source axis ("embed", "L0H0", ...; a head of layer l reads only
    the first 1 + l * n_heads)."""

    direct: Tensor  # (member, n)
    heads: Tensor  # (member, n, layer, head)
    sources: Tensor  # (member, n, layer, head, source)
    source_names: list[str]

    @property
    def total(self) -> Tensor:
        """The centred logit, the sum of the parts: (member, n)."""
        return self.direct + self.heads.sum((-1, -2))


def check_attributable(cfg) -> None:
    """Refuse a model (config) whose logit has no exact split: see the module's docstring."""
    if cfg.norm or cfg.attention == "softmax" or cfg.mlp:
        raise ValueError(
            "attribution: exact for attention-only models without norm and with bilinear or squared "
            f"attention (this one: attention {cfg.attention}, norm {cfg.norm}, mlp {cfg.mlp})"
        )


def _head_writes(model: TensorTransformer, x: Tensor, layer: int, positions: Tensor) -> Tensor:
    """Every head's output at every position: x (M, n, k, D) -> (M, n, H, k, D)."""
    pattern = model.attention_pattern(x, layer, positions)  # (M, n, H, k, k)
    values = torch.einsum("mntd,mhde->mnhte", x, model.W_V[:, layer])
    return torch.einsum("mnhij,mnhje,mhed->mnhid", pattern, values, model.W_O[:, layer])


@functools.lru_cache(maxsize=None)
def _subset_tables(n_sources: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Every non-empty subset of the sources as a 0/1 row (2^S - 1, S), and Shapley's weights for
    their values (2^S - 1, S; v(empty) = 0), made once per device: no copy to the device in a step."""
    S = n_sources
    present = torch.tensor([[b >> s & 1 for s in range(S)] for b in range(1, 2**S)], dtype=dtype)
    return present.to(device), shapley_weights(S, dtype=dtype)[1:].to(device)


def shapley_weights(n_sources: int, device=None, dtype=torch.float64) -> Tensor:
    """(2^S, S): Shapley value of source s = sum_B v(B) * weights[B, s], B a subset as a bit mask
    (bit s set: source s present). From the dividends: phi_s = sum_{A containing s} F(A) / |A| and
    F(A) = sum_{B in A} (-1)^(|A| - |B|) v(B), so weights[B, s] = sum over A with B in A and s in
    A of (-1)^(|A| - |B|) / |A|."""
    S = n_sources
    weights = torch.zeros(2**S, S, dtype=dtype, device=device)
    for a in range(1, 2**S):
        members = [s for s in range(S) if a >> s & 1]
        size = len(members)
        b = a
        while True:  # every subset b of a
            sign = (-1) ** (size - bin(b).count("1"))
            for s in members:
                weights[b, s] += sign / size
            if b == 0:
                break
            b = (b - 1) & a
    return weights


def logit_parts(
    model: TensorTransformer, tokens: Tensor, positions: Tensor, live: Tensor, readout: Tensor
) -> LogitParts:
    """The centred logit along ``readout`` (n, V) at the last slot of each context (tokens,
    positions, live (n, k), as for devinterp.metrics.weights.context_logits) split into the direct
    path, every head, and every head's sources."""
    check_attributable(model.cfg)
    cfg = model.cfg
    M, L, H = cfg.n_members, cfg.n_layers, cfg.n_heads
    centred = readout - readout.sum(-1, keepdim=True) / readout.shape[-1]  # (n, V)
    read = torch.einsum("mdv,nv->mnd", model.W_U, centred.to(model.W_U.dtype))  # (M, n, D)
    embedding = (
        model.embed(tokens[None].expand(M, -1, -1), positions) * live[None, :, :, None]
    )  # (M, n, k, D)
    components = [embedding]  # the embedding, then every head's writes, layer by layer (M, n, k, D) each
    names = ["embed"]
    n_sources = 1 + (L - 1) * H
    heads = embedding.new_zeros(M, tokens.shape[0], L, H)
    sources = embedding.new_zeros(M, tokens.shape[0], L, H, n_sources)
    for layer in range(L):
        inputs = torch.stack(components, 2)  # (M, n, S_l, k, D)
        S = inputs.shape[2]
        present, weights = _subset_tables(S, inputs.device, inputs.dtype)  # (2^S - 1, S) each
        # v(B) for every subset B at once. q, k and the value read are linear in the input, so
        # they are formed once per source and summed per subset; only the products are per subset
        q, k = zip(*(model.queries_keys(inputs[:, :, s], layer, positions) for s in range(S)))
        q = torch.stack(q, 3)[..., -1, :]  # (M, P, n, S, H, dh): the last position's queries
        k = torch.stack(k, 3)  # (M, P, n, S, H, k, dh)
        read_back = torch.einsum("mhef,mnf->mnhe", model.W_O[:, layer], read)  # (M, n, H, dh)
        xv = torch.einsum("mnskd,mhde->mnshke", inputs, model.W_V[:, layer])
        value = torch.einsum("mnshke,mnhe->mnshk", xv, read_back)  # (M, n, S, H, k): each source's value
        q_b = torch.einsum("bs,mpnshe->mpbnhe", present, q)
        k_b = torch.einsum("bs,mpnshke->mpbnhke", present, k)
        scores = torch.einsum("mpbnhe,mpbnhke->mpbnhk", q_b, k_b)  # (M, P, B, n, H, k)
        pattern = combine_pairs(scores, cfg.attention)  # (M, B, n, H, k)
        subset_values = (pattern * torch.einsum("bs,mnshk->mbnhk", present, value)).sum(-1)  # (M, B, n, H)
        sources[:, :, layer, :, :S] = torch.einsum("mbnh,bs->mnhs", subset_values, weights)
        full = inputs.sum(2)
        writes = _head_writes(model, full, layer, positions)  # (M, n, H, k, D)
        heads[:, :, layer] = torch.einsum("mnhd,mnd->mnh", writes[:, :, :, -1], read)
        components += list(writes.unbind(2))
        names += [f"L{layer}H{h}" for h in range(H)]
    direct = torch.einsum("mnd,mnd->mn", embedding[:, :, -1], read)
    return LogitParts(direct, heads, sources, names[:n_sources])


def centred_logit(
    model: TensorTransformer, tokens: Tensor, positions: Tensor, live: Tensor, readout: Tensor
) -> Tensor:
    """The same centred logit from the forward pass (metrics.weights.context_logits): (member, n)."""
    from devinterp.metrics.weights import context_logits

    logits = context_logits(model, tokens, positions, live)  # (M, n, V)
    centred = logits - logits.mean(-1, keepdim=True)
    return torch.einsum("mnv,nv->mn", centred, readout.to(logits.dtype))


class RuleAttribution:
    """``logit_parts`` for every token-level rule of a language, averaged over the rule's minimal
    contexts with the weights of its headline metric (devinterp.metrics.weights.HeadlineMetrics: the
    same contexts, the same weights), read along the rule's true next-token distribution.
    Category-level rules are left out. ``compute(model)`` -> LogitParts with one row per rule
    (``rules``: the headline metric names without ``/kl``; empty for a corpus). ``headline``: the
    run's HeadlineMetrics where one exists already (it samples the language to weigh contexts)."""

    def __init__(self, language, cfg, headline=None):
        from devinterp.metrics.weights import HeadlineMetrics

        headline = headline or HeadlineMetrics(language, cfg.n_ctx)
        t = headline.tensors
        average = t["token_average"].double()  # (n_metrics, n_token_contexts)
        keep = average.sum(1) > 0  # the token-level rules
        self.rules = [i.name.removesuffix("/kl") for i, k in zip(headline.infos, keep.tolist()) if k]
        self.average = average[keep]  # (R, n_token)
        index = t["token_index"]
        self.tokens, self.positions, self.live = t["tokens"][index], t["positions"][index], t["live"][index]
        self.readout = t["token_target"].double()  # (n_token, V)

    def to(self, device) -> "RuleAttribution":
        for name in ("average", "tokens", "positions", "live", "readout"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def compute(self, model: TensorTransformer) -> LogitParts:
        parts = logit_parts(model, self.tokens, self.positions, self.live, self.readout.to(model.W_E.dtype))
        average = self.average.to(model.W_E.dtype)

        def per_rule(x: Tensor) -> Tensor:  # (M, n, ...) -> (M, R, ...)
            return torch.einsum("rn,mn...->mr...", average, x)

        return LogitParts(
            per_rule(parts.direct), per_rule(parts.heads), per_rule(parts.sources), parts.source_names
        )


class AttributionMetrics:
    """Rows of the timeline group ``attribution``: for every token-level rule (RuleAttribution),
    ``attr/<primitive>/<rule>/direct``, ``attr/<primitive>/<rule>/L<l>H<h>`` for every head, and
    for every head of a layer >= 1 ``attr/<primitive>/<rule>/L<l>H<h><-<source>`` for each source
    it reads (``embed``, ``L<l'>H<h'>`` of earlier layers). Values are expected centred logits
    (nats of logit); a rule's direct part and head parts sum to its centred logit, a head's
    source parts to the head's part. ``applies(cfg)`` says whether the model has the split.
    ``rules``: the RuleAttribution to use where one exists already."""

    @staticmethod
    def applies(cfg) -> bool:
        try:
            check_attributable(cfg)
        except ValueError:
            return False
        return True

    def __init__(self, language, cfg, rules: RuleAttribution | None = None):
        from devinterp.store.schema import MetricInfo

        self.rules = rules or RuleAttribution(language, cfg)
        L, H = cfg.n_layers, cfg.n_heads
        self.source_names = ["embed"] + [f"L{layer}H{h}" for layer in range(L - 1) for h in range(H)]
        infos = []
        for rule in self.rules.rules:
            primitive, rule_name = rule.split("/", 1)
            names = [f"attr/{rule}/direct"] + [
                f"attr/{rule}/L{layer}H{h}" for layer in range(L) for h in range(H)
            ]
            names += [
                f"attr/{rule}/L{layer}H{h}<-{source}"
                for layer in range(1, L)
                for h in range(H)
                for source in self.source_names[: 1 + layer * H]
            ]
            infos += [MetricInfo(n, "diagnostic", primitive, rule_name, unit="logit") for n in names]
        self.infos = infos

    def to(self, device) -> "AttributionMetrics":
        self.rules.to(device)
        return self

    def compute(self, model: TensorTransformer) -> Tensor:
        """(n_metrics, member) in the order of ``infos``."""
        cfg = model.cfg
        L, H = cfg.n_layers, cfg.n_heads
        parts = self.rules.compute(model)
        M, R = parts.direct.shape
        rows = [parts.direct[..., None], parts.heads.flatten(2)]  # (M, R, 1), (M, R, L * H)
        rows += [parts.sources[:, :, layer, :, : 1 + layer * H].flatten(2) for layer in range(1, L)]
        return torch.cat(rows, -1).permute(1, 2, 0).reshape(-1, M).float()  # (rule, part) major, as the infos


def mlp_interaction(model: TensorTransformer, layer: int, read: Tensor) -> Tensor:
    """The interaction matrix of a bilinear MLP's direct path read along ``read`` (member, n, D)
    (Pearce et al. 2024, "Bilinear MLPs enable weight-based mechanistic interpretability",
    arXiv 2410.08417): read . MLP(x) = x^T B x with B = sum_f (W_out[f] . read) W_in[:, f]
    W_gate[:, f]^T, symmetrised, here in the token basis: Q[a, b] = E_a B E_b^T. Its diagonal
    Q[a, a] = read . MLP(E_a) is the MLP's direct-path push along ``read`` from token a; off the
    diagonal, the interaction of tokens a and b present in the residual together.
    (member, n, V, V), symmetric."""
    out = torch.einsum("mfd,mnd->mnf", model.W_out[:, layer], read)  # (M, n, d_mlp)
    left = model.W_E @ model.W_in[:, layer]  # (M, V, d_mlp)
    right = model.W_E @ model.W_gate[:, layer]
    q = torch.einsum("maf,mnf,mbf->mnab", left, out, right)
    return (q + q.transpose(-1, -2)) / 2


def mlp_eigen(model: TensorTransformer, layer: int, read: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    """The ``k`` eigenvalues of largest magnitude of ``mlp_interaction`` (member, n, k), signed,
    and their eigenvectors over tokens (member, n, V, k), each of unit norm."""
    values, vectors = torch.linalg.eigh(mlp_interaction(model, layer, read))
    order = values.abs().argsort(-1, descending=True)[..., :k]
    return values.gather(-1, order), vectors.gather(-1, order[..., None, :].expand(*vectors.shape[:-1], k))


class MlpEigenMetrics:
    """Rows of the timeline group ``mlp`` (bilinear-MLP models): for every MLP layer and
    token-level rule, the ``k`` eigenvalues of largest magnitude of the MLP's direct-path
    interaction matrix read along the rule's output (``mlp_eigen``; the read direction is the
    centred unembedding of the rule's true next-token distribution averaged over its contexts):
    ``mlp/L<l>/<primitive>/<rule>/eig<i>``, signed."""

    def __init__(self, language, cfg, k: int = 3, rules: RuleAttribution | None = None):
        from devinterp.store.schema import MetricInfo

        self.rules = rules or RuleAttribution(language, cfg)
        self.k = k
        self.cfg = cfg
        self.infos = [
            MetricInfo(f"mlp/L{layer}/{rule}/eig{i + 1}", "diagnostic", *rule.split("/", 1))
            for layer in range(cfg.n_layers)
            for rule in self.rules.rules
            for i in range(k)
        ]

    def to(self, device) -> "MlpEigenMetrics":
        self.rules.to(device)
        return self

    def read_directions(self, model: TensorTransformer) -> Tensor:
        """(member, rule, d_model): each rule's centred unembedding of its mean output distribution."""
        readout = self.rules.average @ self.rules.readout  # (R, V): weights sum to 1 per rule
        centred = readout - readout.mean(-1, keepdim=True)
        return torch.einsum("mdv,rv->mrd", model.W_U, centred.to(model.W_U.dtype))

    def compute(self, model: TensorTransformer) -> Tensor:
        """(n_metrics, member) in the order of ``infos``."""
        read = self.read_directions(model)
        rows = [mlp_eigen(model, layer, read, self.k)[0] for layer in range(self.cfg.n_layers)]  # (M, R, k)
        M = read.shape[0]
        return torch.stack(rows, 1).reshape(M, -1).T.float()
