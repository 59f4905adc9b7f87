"""Probe-set evaluation: per-primitive and per-rule excess loss and accuracy of every member.

Excess loss at a position is the model's expected cross-entropy minus the exact entropy of the
next token, i.e. KL(true next-token distribution || model), computed exactly from
``Language.true_next_dist`` rather than from the one sampled token. Accuracy is whether the
model's top token equals the true distribution's top token (the Bayes-optimal guess), so a
stochastic rule learned perfectly scores 1.

A corpus made elsewhere has no distributions: its excess loss at a position is the model's
loss on the token that came next plus the corpus's log p of it (a sample whose mean over
positions estimates the KL; NaN without logp), and accuracy is against the token that came next.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from devinterp.data import ProbeSet
from devinterp.model import TensorTransformer


@dataclass(frozen=True)
class ProbeResult:
    excess_by_label: Tensor  # (member, n_labels): mean KL over positions of each label (NaN if none)
    accuracy_by_label: Tensor  # (member, n_labels)
    excess_by_rule: Tensor  # (member, n_rules)
    excess: Tensor  # (member,): mean KL over all predicted positions
    loss_by_position: Tensor  # (member, T - 1): cross-entropy of the sampled token t + 1 at each t
    loss_by_label: Tensor  # (member, n_labels): mean cross-entropy of the sampled next tokens
    excess_sq_by_label: Tensor | None = None  # (member, n_labels): mean squared excess (its spread)
    strategy_kl: Tensor | None = None  # (member, n_strategies): devinterp/strategies.py's group

    def apply(self, fn) -> "ProbeResult":
        """The same result with ``fn`` applied to every tensor (e.g. moved or cast)."""
        return ProbeResult(*(None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(self)))


@dataclass(frozen=True)
class StrategyRows:
    """A StrategyTable (devinterp/strategies.py) as tensors on the model's device; ``starts``
    (n_probe + 1,) on the host: the first row of each probe sequence, so a batch's rows are a
    slice found without asking the device."""

    sequence: Tensor  # (rows,)
    position: Tensor  # (rows,)
    strategy: Tensor  # (rows,)
    probs: Tensor  # (rows, V)
    plogp: Tensor  # (rows,)
    counts: Tensor  # (n_strategies,): rows per strategy
    starts: np.ndarray  # (n_probe + 1,)

    @classmethod
    def of(cls, table, n_probe: int, device: torch.device | str) -> "StrategyRows":
        def move(array: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device)

        counts = np.bincount(table.strategy, minlength=len(table.infos)).astype(np.float32)
        starts = np.searchsorted(table.sequence, np.arange(n_probe + 1))
        return cls(
            *(move(a) for a in (table.sequence, table.position, table.strategy, table.probs, table.plogp)),
            move(counts),
            starts,
        )

    def batch_kl(self, log_q: Tensor, first: int, stop: int) -> tuple[Tensor, Tensor]:
        """(KL(strategy || model) of the rows of probe sequences first..stop-1 (member, rows), their
        strategy ids (rows,)) from log_q (member, stop - first, T-1, V)."""
        lo, hi = int(self.starts[first]), int(self.starts[stop])
        picked = log_q[:, self.sequence[lo:hi] - first, self.position[lo:hi]]  # (M, rows, V)
        kl = self.plogp[lo:hi] - (picked * self.probs[lo:hi]).sum(-1)
        return kl, self.strategy[lo:hi]


def grouped_sums(values: Tensor, groups: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Sum and count of values per group id, member by member.

    values (member, n); groups (n,) shared by members or (member, n), ids in [0, n_groups) or
    -1 (ignored) -> sums, counts, each (member, n_groups).
    """
    M = values.shape[0]
    groups = groups.expand(M, -1)
    member_offset = n_groups * torch.arange(M, device=values.device)[:, None]
    flat = torch.where(groups >= 0, groups + member_offset, M * n_groups).flatten()  # -1 -> spare bin
    sums = values.new_zeros(M * n_groups + 1).index_add_(0, flat, values.flatten())
    # index_add of ones, not bincount: bincount reads the largest id on the host (a GPU sync)
    counts = values.new_zeros(M * n_groups + 1).index_add_(0, flat, torch.ones_like(values).flatten())
    return sums[:-1].view(M, n_groups), counts[:-1].view(M, n_groups)


def grouped_mean(values: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """Mean of values per group id (see grouped_sums) -> (member, n_groups), NaN where a
    member's group is empty."""
    sums, counts = grouped_sums(values, groups, n_groups)
    return sums / counts  # 0 / 0 = NaN marks an empty group


def excess_kl(log_q: Tensor, true_next: Tensor, true_plogp: Tensor) -> Tensor:
    """KL(true || model) per position: log_q (member, batch, pos, V) model log-probabilities,
    true_next (batch, pos, V), true_plogp (batch, pos) = sum p log p -> (member, batch, pos)."""
    return true_plogp - torch.einsum("btv,mbtv->mbt", true_next, log_q)


def position_losses(
    log_q: Tensor, next_tokens: Tensor, true_next: Tensor | None, true_plogp: Tensor
) -> tuple[Tensor, Tensor]:
    """Loss on the token that came next and excess loss per position, each (member, batch, pos),
    from log_q (member, batch, pos, V) and next_tokens (member or 1, batch, pos): the excess is
    the exact KL with distributions (batch, pos, V), else the sampled gap ``nll + log p``."""
    nll = -log_q.gather(-1, next_tokens.expand(*log_q.shape[:-1])[..., None])[..., 0]
    if true_next is not None:
        return nll, excess_kl(log_q, true_next, true_plogp)
    return nll, nll + true_plogp


@torch.inference_mode()
def evaluate_probe(
    model: TensorTransformer,
    probe: ProbeSet,
    n_labels: int,
    n_rules: int,
    batch_size: int = 8,
    strategies: StrategyRows | None = None,
) -> ProbeResult:
    """Every member on the shared probe set; with ``strategies``, also the strategy curves'
    values. Values stay on the model's device."""
    device = model.W_E.device
    probe = probe.to(device)  # a no-op for a set already there (ProbeMetrics moves it once)
    M = model.cfg.n_members
    kl_parts, correct_parts, nll_parts = [], [], []
    strategy_sums = None if strategies is None else torch.zeros(M, len(strategies.counts), device=device)
    for start in range(0, probe.tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        tokens = probe.tokens[rows]
        true_next = None if probe.true_next is None else probe.true_next[rows]  # (B, T-1, V)
        log_q = model(tokens[None, :, :-1].expand(M, -1, -1)).float().log_softmax(-1)  # (M, B, T-1, V)
        nll, kl = position_losses(
            log_q, tokens[None, :, 1:], true_next, probe.true_plogp[rows]
        )  # (M, B, T-1)
        correct = log_q.argmax(-1) == probe.true_top[rows]  # (M, B, T-1)
        if strategies is not None:
            strategy_kl, ids = strategies.batch_kl(log_q, start, min(start + batch_size, len(probe.tokens)))
            strategy_sums.index_add_(1, ids, strategy_kl)
        nll_parts.append(nll)
        kl_parts.append(kl.flatten(1))
        correct_parts.append(correct.flatten(1).float())
    kl, correct = torch.cat(kl_parts, 1), torch.cat(correct_parts, 1)  # (M, n_positions)
    nll = torch.cat(nll_parts, 1)  # (M, n_probe, T-1)
    labels = probe.labels[:, 1:].reshape(-1)
    rules = probe.rules[:, 1:].reshape(-1)
    return ProbeResult(
        excess_by_label=grouped_mean(kl, labels, n_labels),
        accuracy_by_label=grouped_mean(correct, labels, n_labels),
        excess_by_rule=grouped_mean(kl, rules, n_rules),
        excess=kl.mean(1),
        loss_by_position=nll.mean(1),
        loss_by_label=grouped_mean(nll.flatten(1), labels, n_labels),
        excess_sq_by_label=grouped_mean(kl.square(), labels, n_labels),
        strategy_kl=None if strategies is None else strategy_sums / strategies.counts,
    )


@torch.inference_mode()
def span_queries(open_positions: Tensor) -> Tensor:
    """(..., T) open positions (-1 outside spans) -> bool (..., T): the positions that query a
    span's open, those inside a span after its open (the open itself is not a query)."""
    positions = torch.arange(open_positions.shape[-1], device=open_positions.device)
    return (open_positions >= 0) & (open_positions < positions)


def attention_to_open(
    model: TensorTransformer, tokens: Tensor, open_positions: Tensor, batch_size: int = 8
) -> Tensor:
    """How much each head attends from a position inside a span (quote, brackets) to the open
    token in force, on data, for S span primitives in one pass.

    tokens (batch, T); open_positions (S, batch, T): the open's position for the query at t, -1
    outside spans (the open itself is not a query). The share of a head's attention at t on the
    open is |A[t, open]| / sum_s |A[t, s]| (absolute values: bilinear patterns are signed and
    unnormalised). Returns the mean share (S, member, layer, head), NaN for a span without
    queries. ``uniform_share`` gives what a head attending evenly would score.
    """
    M, cfg = model.cfg.n_members, model.cfg
    S = open_positions.shape[0]
    device = model.W_E.device
    tokens, open_positions = tokens.to(device), open_positions.to(device)
    queries = span_queries(open_positions).double()
    total = torch.zeros(S, M, cfg.n_layers, cfg.n_heads, device=device, dtype=torch.float64)
    for start in range(0, tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        patterns: list[Tensor] = []
        model.blocks(model.embed(tokens[rows][None].expand(M, -1, -1)), patterns=patterns)
        for layer, pattern in enumerate(patterns):
            pattern = pattern.abs().double()  # (M, B, H, T, T)
            row_mass = pattern.sum(-1).clamp_min(1e-30)  # (M, B, H, T)
            for span in range(S):
                where = open_positions[span, rows].clamp_min(0)  # (B, T)
                index = where[None, :, None, :, None].expand(M, -1, cfg.n_heads, -1, 1)
                share = pattern.gather(-1, index)[..., 0] / row_mass  # (M, B, H, T)
                total[span, :, layer] += (share * queries[span, rows][None, :, None, :]).sum((1, 3))
    n = queries.sum((1, 2))  # (S,)
    return (total / n[:, None, None, None]).float()


def uniform_share(open_positions: np.ndarray) -> float:
    """Mean of 1 / (t + 1) over the queries of one span primitive's (batch, T) open positions:
    the share of a head that attends evenly to every earlier position."""
    t = np.arange(open_positions.shape[1])
    queries = (open_positions >= 0) & (open_positions < t)
    return float((queries / (t + 1)).sum() / queries.sum()) if queries.any() else float("nan")
