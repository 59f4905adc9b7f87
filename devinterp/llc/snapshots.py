"""LLC estimates of a trained run's weight snapshots: the whole model, data-refined per primitive
and weight-refined per head (devinterp.llc.sampler does the sampling).

Conventions, stated once:

- The data are a fixed pool of ``pool_size`` sequences drawn once from the run's language
  (``POOL_SEED``, independent of training): the dataset D_n the LLC is local to. Every copy
  (member x chain) draws its batch from the pool at every step, by an index generator seeded with
  the step, so the loss at w* is evaluated on the very batches the draws see.
- The loss is the training loss, the mean next-token cross-entropy, over all predicted
  positions (``model``) or over the positions the DGP labels with one primitive (data-refined,
  Wang et al. 2024). A primitive's batches are drawn from the pool's sequences that hold at
  least one of its positions, so no chain's loss is empty (NaN) by construction.
- Weight-refined ``L<l>H<h>``: only that head's W_Q, W_K (both pairs), W_V and W_O move; every
  other weight stays at the snapshot's. The loss is the whole model's.
- n_beta is fixed by the caller for every refinement of a run, so their estimates compare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from devinterp.language import parse_language
from devinterp.language.corpus import load_corpus
from devinterp.llc.sampler import LLCEstimate, SamplerConfig, estimate_llc
from devinterp.model import ModelConfig, TensorTransformer, members_per_pass
from devinterp.restore import model_config

POOL_SEED = 1_000_003  # the LLC data pool's seed: fixed, so every snapshot sees the same data
HEAD_PARAMETERS = ("W_Q", "W_K", "W_V", "W_O")  # per-head weights; W_Q, W_K: (member, layer, pair, head, ...)


@dataclass(frozen=True)
class Refinement:
    """What one estimate is restricted to: ``label`` (data) or ``head`` (weights), or neither."""

    name: str  # "model", a primitive, or "L<l>H<h>"
    label: int | None = None  # index into the language's label names
    head: tuple[int, int] | None = None  # (layer, head)


def refinements(label_names: list[str], cfg: ModelConfig, which: list[str] | None = None) -> list[Refinement]:
    """Every refinement of a run (the model, each primitive, each head), or those named."""
    every = [Refinement("model")]
    every += [Refinement(name, label=i) for i, name in enumerate(label_names) if name != "start"]
    every += [
        Refinement(f"L{layer}H{head}", head=(layer, head))
        for layer in range(cfg.n_layers)
        for head in range(cfg.n_heads)
    ]
    if which is None:
        return every
    known = {r.name: r for r in every}
    unknown = [name for name in which if name not in known]
    if unknown:
        raise ValueError(f"refinements: no {unknown[0]!r} in this run (choose from {', '.join(known)})")
    return [known[name] for name in which]


@dataclass(frozen=True)
class DataPool:
    tokens: torch.Tensor  # (sequence, pos) int64
    labels: torch.Tensor  # (sequence, pos) int64

    @classmethod
    def from_spec(cls, spec: dict, size: int, seq_len: int) -> DataPool:
        sample = parse_language(spec).sample(size, seq_len, POOL_SEED)
        return cls(torch.from_numpy(sample.tokens), torch.from_numpy(sample.labels))

    @classmethod
    def from_corpus(cls, recorded: dict, data_config: dict, size: int, seq_len: int) -> DataPool:
        """``size`` of a corpus run's training sequences (a ``POOL_SEED`` choice; all of them if
        fewer), from the file the timeline recorded, refused in one line if it changed since."""
        path = Path(str(recorded["corpus"]))
        try:
            corpus = load_corpus(path)
        except OSError as error:
            raise ValueError(
                f"{path}: cannot read the run's corpus ({error.strerror or error}; recorded in "
                "meta/language_spec)"
            ) from None
        if corpus.digest != str(recorded.get("sha256", "")):
            raise ValueError(
                f"{path}: the corpus has changed since the run trained on it (sha256 "
                f"{corpus.digest[:12]}..., recorded {str(recorded.get('sha256', ''))[:12]}...); its LLC "
                "would be of other data"
            )
        corpus.split(int(data_config.get("probe_size", 0)), int(data_config.get("probe_seed", 2**31 - 1)))
        rows = corpus.train_rows
        chosen = np.sort(np.random.default_rng(POOL_SEED).permutation(len(rows))[:size])
        tokens = np.ascontiguousarray(corpus.tokens[rows[chosen], :seq_len])
        labels = np.ascontiguousarray(corpus.labels[rows[chosen], :seq_len])
        return cls(torch.from_numpy(tokens), torch.from_numpy(labels))

    @classmethod
    def from_run(cls, recorded: dict | None, data_config: dict, size: int, seq_len: int) -> DataPool:
        """The pool of a run from what its timeline recorded: a language spec, or a corpus's
        description (its path and sha256)."""
        if isinstance(recorded, dict) and "primitives" in recorded:
            return cls.from_spec(recorded, size, seq_len)
        if isinstance(recorded, dict) and "corpus" in recorded:
            return cls.from_corpus(recorded, data_config, size, seq_len)
        raise ValueError("meta/language_spec: neither a language spec nor a corpus description")

    def holding(self, label: int | None) -> torch.Tensor:
        """Indices of the sequences with at least one predicted position of ``label``."""
        if label is None:
            return torch.arange(len(self.tokens), device=self.tokens.device)
        return torch.nonzero((self.labels[:, 1:] == label).any(dim=1)).flatten()


def snapshot_params(weights: dict[str, np.ndarray], members: list[int]) -> dict[str, torch.Tensor]:
    """A snapshot's weights (member, ...) as float32 tensors, for the chosen members."""
    return {name: torch.from_numpy(np.ascontiguousarray(value[members])) for name, value in weights.items()}


def head_mask(params: dict[str, torch.Tensor], layer: int, head: int) -> dict[str, torch.Tensor]:
    """1 on one head's own weights, 0 everywhere else (every other parameter frozen)."""
    mask = {name: torch.zeros_like(value[:1]) for name, value in params.items()}
    for name in HEAD_PARAMETERS:
        if name in ("W_Q", "W_K"):
            mask[name][:, layer, :, head] = 1.0
        else:
            mask[name][:, layer, head] = 1.0
    return mask


class PoolLoss:
    """The loss of every copy on its own batch of the pool: ``loss(params (copy, ...), step)`` ->
    (copy,). Copy c's batch at a step is drawn by an index generator seeded with the step, never
    from the weights (so the loss at w* can be taken on the very batches the draws see)."""

    def __init__(
        self, model: TensorTransformer, pool: DataPool, refinement: Refinement, batch_size: int, seed: int = 0
    ):
        device = next(model.parameters()).device
        pool = DataPool(pool.tokens.to(device), pool.labels.to(device))
        self.rows = pool.holding(refinement.label)
        if len(self.rows) == 0:
            raise ValueError(f"{refinement.name}: no sequence of the data pool holds this primitive")
        self.model, self.pool, self.refinement = model, pool, refinement
        self.batch_size, self.seed = batch_size, seed
        self.n_copies = model.cfg.n_members

    def batch(self, step: int) -> torch.Tensor:
        """(copy, batch) pool indices of every copy's batch at ``step``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)  # on the CPU on any device
        index = torch.randint(len(self.rows), (self.n_copies, self.batch_size), generator=generator)
        return self.rows[index.to(self.rows.device, non_blocking=True)]

    def reduce(self, nll: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        """(copy, batch, pos - 1) per-position losses -> (copy,) means over the refinement's positions."""
        nll = nll.reshape(len(picked), -1)
        if self.refinement.label is None:
            return nll.mean(dim=1)
        keep = (self.pool.labels[picked][..., 1:] == self.refinement.label).reshape(len(picked), -1)
        keep = keep.to(nll.dtype)
        return (nll * keep).sum(dim=1) / keep.sum(dim=1)

    def __call__(
        self, params: dict[str, torch.Tensor], step: int, copies: slice = slice(None)
    ) -> torch.Tensor:
        """The losses of the copies ``copies`` (all by default) at ``params`` (those copies, ...)."""
        picked = self.batch(step)[copies]
        tokens = self.pool.tokens[picked]  # (copy, batch, pos)
        model = self.model.twin(len(picked))
        logits = functional_call(model, params, (tokens[..., :-1],))  # (copy, batch, pos - 1, vocab)
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 2).float(), tokens[..., 1:].flatten(), reduction="none"
        )
        return self.reduce(nll, picked)

    def at_anchor(self, init: dict[str, torch.Tensor], sequences_per_pass: int = 2048):
        """``step -> (copy,)`` losses at w* = ``init`` (group, ...) on every step's batches, read
        from the per-position losses of every group on the whole pool, computed once here: the same
        numbers as ``self(repeated init, step)`` without a forward pass per draw (which cost a
        quarter of the sampler's time). Copy c belongs to group c // (copies / groups). The pool
        goes through in passes of about ``sequences_per_pass`` sequences over all groups."""
        groups = next(iter(init.values())).shape[0]
        chunk = max(1, sequences_per_pass // groups)
        if self.n_copies % groups:
            raise ValueError(f"init: {groups} groups do not divide {self.n_copies} copies")
        model = self.model.twin(groups)
        pool_nll = torch.empty(groups, *self.pool.tokens[:, 1:].shape, device=self.pool.tokens.device)
        with torch.no_grad():
            for start in range(0, len(self.pool.tokens), chunk):
                tokens = self.pool.tokens[start : start + chunk]
                inputs = tokens[None, :, :-1].expand(groups, -1, -1)
                logits = functional_call(model, init, (inputs,)).float()  # (group, chunk, pos - 1, vocab)
                pool_nll[:, start : start + chunk] = torch.nn.functional.cross_entropy(
                    logits.flatten(0, 2), tokens[:, 1:].repeat(groups, 1).flatten(), reduction="none"
                ).view(groups, len(tokens), -1)
        group_of_copy = torch.arange(self.n_copies) // (self.n_copies // groups)

        def init_loss(step: int) -> torch.Tensor:
            picked = self.batch(step)
            return self.reduce(pool_nll[group_of_copy[:, None], picked], picked)

        return init_loss


LLC_PASS_BYTES = 32 * 2**20  # a pass's attention scores: these CPUs' last-level cache (32 MiB)


def copies_per_pass(cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
    """How many chain copies one SGLD pass takes on a CPU (``members_per_pass`` at
    ``LLC_PASS_BYTES``). Measured here (quickstart size, batch 16; a forward and backward per
    pass): 7.1-7.7 ms per copy from 8 to 32 copies a pass, 9.4 ms at 64 and 18.5 ms at 128, where
    the scores of all copies (130 MB) spill to memory."""
    return members_per_pass(cfg.n_heads, batch_size, seq_len - 1, LLC_PASS_BYTES)


def make_loss(
    model: TensorTransformer, pool: DataPool, refinement: Refinement, batch_size: int, seed: int = 0
) -> PoolLoss:
    """The loss of every copy on its own batch: (params (copy, ...), step) -> (copy,)."""
    return PoolLoss(model, pool, refinement, batch_size, seed)


def snapshot_llc(
    config_yaml: str,
    weights: dict[str, np.ndarray],
    refinement: Refinement,
    sampler: SamplerConfig,
    members: list[int],
    pool: DataPool,
    batch_size: int,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    device: str = "cpu",
) -> LLCEstimate:
    """The LLC of each chosen member of one snapshot, all members' chains in one batched model on
    ``device``; on a CPU in passes of copies sized to its cache (``copies_per_pass``)."""
    cfg = model_config(config_yaml, n_members=len(members) * sampler.chains)
    model = TensorTransformer(cfg).to(device)
    params = {name: value.to(device) for name, value in snapshot_params(weights, members).items()}
    mask = head_mask(params, *refinement.head) if refinement.head is not None else None
    on_cpu = torch.device(device).type == "cpu"
    per_pass = copies_per_pass(cfg, batch_size, pool.tokens.shape[1]) if on_cpu else None
    loss = make_loss(model, pool, refinement, batch_size, seed)
    return estimate_llc(
        loss,
        params,
        sampler,
        mask=mask,
        seed=seed,
        anchor_loss=loss.at_anchor(params, per_pass * batch_size if per_pass else 2048),
        progress=progress,
        copies_per_pass=per_pass,
    )
