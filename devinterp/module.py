"""The LightningModule: trains an ensemble of tensor-transformers, one loss per member summed.

Loss = sum over members of each member's mean cross-entropy, so member k's gradients are
exactly those it would get trained alone, and AdamW (element-wise) updates each member as if it
were alone. Per-primitive training losses of every member are computed on the device every step
and returned by ``training_step`` as ``loss_row`` (Lightning hands them to callbacks as
``outputs``); the CircuitMetrics callback puts them in the timeline with the weight metrics, and
the TimelineWriter moves them to the host in blocks (one transfer per flush).
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from devinterp.errors import UsageError, at_least
from devinterp.model import (
    Attention,
    AttentionPath,
    ModelConfig,
    Positions,
    TensorTransformer,
    members_per_pass,
)
from devinterp.probe import grouped_mean, grouped_sums, position_losses

# a training pass's attention scores on a CPU. Quickstart members (batch 32) hold 2 MiB each; a
# step of 16 took 261 ms in one pass, 216 in passes of 4, 212 of 2, 210 of 1 (4 members: 67, 57,
# 54 ms in passes of 4, 2, 1), so a pass holds what fits 2 MiB (bench/ensemble_scaling.py)
TRAIN_PASS_BYTES = 2 * 2**20

LrSchedule = Literal["constant", "cosine"]


class TensorTransformerModule(L.LightningModule):
    """Trains ``n_members`` tensor-transformers in lockstep.

    Args:
        d_vocab, n_ctx, label_names: from the language (linked from the data by the CLI).
        n_members: independent models trained at once; member k is initialised with seed + k.
        seed: initialisation seed of member 0.
        n_layers, n_heads, d_model, d_head, attention, positions, mlp, d_mlp, norm: the
            architecture (see ``devinterp.model``).
        attention_path: ``auto`` (the cheaper of the two), ``quadratic`` (T x T patterns) or
            ``linear`` (chunked linear attention, ``linear_chunk`` positions per chunk; long
            sequences); both compute the same function.
        members_per_pass: members in one forward pass while training (the same function; see
            ``TensorTransformer.in_passes``): None (the default) takes, on a CPU, as many as keep
            a layer's attention scores within 2 MiB (``TRAIN_PASS_BYTES``), on a GPU all of them.
        compile: train through ``torch.compile(model, fullgraph=True)``: a graph break or a
            recompilation past the limit is an error, never a silent fall-back to eager. Probes
            and circuit metrics use the eager model.
        lr, weight_decay, betas: AdamW.
        warmup_steps: linear warm-up from 0; then ``schedule``: constant, or cosine to
            ``min_lr_ratio * lr`` at ``trainer.max_steps``.
    """

    def __init__(
        self,
        d_vocab: int = 0,
        n_ctx: int = 64,
        label_names: list[str] | None = None,
        n_members: int = 1,
        seed: int = 0,
        n_layers: int = 2,
        n_heads: int = 4,
        d_model: int = 64,
        d_head: int = 16,
        attention: Attention = "bilinear",
        positions: Positions = "rope",
        mlp: bool = False,
        d_mlp: int = 256,
        norm: bool = False,
        attention_path: AttentionPath = "auto",
        linear_chunk: int = 64,
        members_per_pass: int | None = None,
        compile: bool = False,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 200,
        schedule: LrSchedule = "constant",
        min_lr_ratio: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        if d_vocab < 1:
            raise UsageError("model.d_vocab: must be set from the language (got 0)")
        if not lr > 0:
            raise UsageError(f"model.lr: must be above 0, got {lr}")
        at_least(weight_decay, 0, "model.weight_decay")
        at_least(warmup_steps, 0, "model.warmup_steps")
        if members_per_pass is not None:
            at_least(members_per_pass, 1, "model.members_per_pass")
        if not all(0 <= b < 1 for b in betas):
            raise UsageError(f"model.betas: both must be in [0, 1), got {list(betas)}")
        if not 0 <= min_lr_ratio <= 1:
            raise UsageError(f"model.min_lr_ratio: must be in [0, 1], got {min_lr_ratio}")
        self.cfg = ModelConfig(
            d_vocab=d_vocab,
            n_ctx=n_ctx,
            n_members=n_members,
            n_layers=n_layers,
            n_heads=n_heads,
            d_model=d_model,
            d_head=d_head,
            attention=attention,
            positions=positions,
            mlp=mlp,
            d_mlp=d_mlp,
            norm=norm,
            attention_path=attention_path,
            linear_chunk=linear_chunk,
        )
        self.model = TensorTransformer(self.cfg, seed=seed)
        self._train_forward = self._forward_in_passes  # a function, so it adds no parameters
        if compile:
            torch._dynamo.config.fail_on_recompile_limit_hit = True
            self._train_forward = torch.compile(self.model.forward, fullgraph=True)
        self.label_names = list(label_names or ["start"])

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    def _forward_in_passes(self, tokens: Tensor) -> Tensor:
        """The training forward: tokens (member, batch, pos) -> logits, in passes of members."""
        per_pass = self.hparams.members_per_pass
        if per_pass is None:
            per_pass = tokens.shape[0]
            if tokens.device.type == "cpu":
                per_pass = members_per_pass(
                    self.cfg.n_heads, tokens.shape[1], tokens.shape[2], TRAIN_PASS_BYTES
                )
        return self.model.in_passes(tokens, per_pass)

    def token_losses(self, tokens: Tensor, forward=None) -> Tensor:
        """tokens (member, batch, pos) -> cross-entropy of every predicted token (member,
        batch * (pos - 1)), predicting tokens[..., 1:] from tokens[..., :-1]."""
        M = tokens.shape[0]
        logits = (forward or self.model)(tokens[..., :-1])  # (M, B, T-1, V)
        return F.cross_entropy(
            logits.flatten(0, 2).float(), tokens[..., 1:].flatten(), reduction="none"
        ).view(M, -1)

    def member_losses(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """tokens, labels (member, batch, pos) -> mean loss per member (member,) and per label
        (member, n_labels)."""
        nll = self.token_losses(tokens, self._train_forward)  # as a training step computes it
        return nll.mean(1), grouped_mean(
            nll, labels[..., 1:].reshape(nll.shape[0], -1), len(self.label_names)
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """The summed loss, and ``loss_row`` (member, 1 + n_labels): each member's mean loss,
        then per label. Nothing is self.log-ged: Lightning would read it on the host every step;
        the progress bar shows the loss of the last flushed step (TimelineWriter)."""
        nll = self.token_losses(batch["tokens"], self._train_forward)  # (M, local tokens)
        return {"loss": nll.mean(1).sum(), "loss_row": self._loss_row(nll.detach(), batch["labels"])}

    def _loss_row(self, nll: Tensor, labels: Tensor) -> Tensor:
        """(member, 1 + n_labels): the mean loss, then per label, over the global batch. Under
        DDP every process holds a slice of the batch: sums and counts are all-reduced (on the
        device, no host sync) so the row equals a one-process run's."""
        M = nll.shape[0]
        sums, counts = grouped_sums(nll, labels[..., 1:].reshape(M, -1), len(self.label_names))
        stats = torch.cat([nll.sum(1, keepdim=True), sums, nll.new_full((M, 1), nll.shape[1]), counts], 1)
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            torch.distributed.all_reduce(stats)
        total, per_label_sums, n, per_label_counts = stats.split([1, sums.shape[1], 1, counts.shape[1]], 1)
        return torch.cat([total / n, per_label_sums / per_label_counts], 1)

    def on_validation_epoch_start(self) -> None:
        self._val_kl: list[Tensor] = []
        self._val_labels: list[Tensor] = []

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Excess loss on the probe set, per member and position: the exact KL(true || model)
        for a language, the sampled gap for a corpus (probe.position_losses)."""
        tokens = batch["tokens"]  # (M, B, T); true_next (B, T-1, V) for a language
        log_q = self.model(tokens[..., :-1]).float().log_softmax(-1)  # (M, B, T-1, V)
        _, kl = position_losses(
            log_q, tokens[..., 1:], batch.get("true_next"), batch["true_plogp"]
        )  # (M, B, T-1)
        self._val_kl.append(kl.flatten(1))
        self._val_labels.append(batch["labels"][0, :, 1:].flatten())

    def on_validation_epoch_end(self) -> None:
        kl, labels = torch.cat(self._val_kl, 1), torch.cat(self._val_labels)
        per_label = grouped_mean(kl, labels, len(self.label_names)).nanmedian(0).values
        metrics = {"val/excess": kl.mean(1).median()}
        metrics.update({f"val_excess/{n}": v for n, v in zip(self.label_names, per_label) if not v.isnan()})
        self.log_dict(metrics)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """``--trainer.gradient_clip_val`` clips each member's gradient on its own: Lightning's
        norm clipping takes one norm over every parameter, which would couple the members.
        Per member it is torch's ``clip_grad_norm_`` (scale ``max / (norm + 1e-6)``, at most 1);
        value clipping is element-wise, so Lightning's own is already per member."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]  # each (member, ...)
        if not grads:
            return
        norms = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (member,)
        scale = (gradient_clip_val / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))

    def configure_optimizers(self):
        hp = self.hparams
        # fused: one kernel for all parameters, and its step counters stay on the device (the
        # default implementation reads them on the host every step)
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay, fused=True
        )
        max_steps = self.trainer.max_steps if self.trainer is not None else -1

        def lr_factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.schedule == "constant" or max_steps <= hp.warmup_steps:
                return 1.0
            progress = min(1.0, (step - hp.warmup_steps) / (max_steps - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
