"""The progress bar, without a host synchronisation per step.

Lightning's bar shows values given to ``self.log``, read on the host at every step. The
TimelineWriter logs, at each flush and only then, the training loss (median over members) of the
last step it flushed as the progress-bar metrics ``loss`` and ``loss_step``, host values already;
this bar shows them as one field, ``loss 2.3456 (step 99)``, the step saying how old it is. The
CLI uses it whenever the progress bar is on and the config names no other.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class FlushedLossBar(TQDMProgressBar):
    """Counts optimiser steps against ``max_steps`` (a resumed run starts where it stopped, and
    its rate counts this segment's steps only), not batches of an epoch of unknown length."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._count_steps(trainer)  # a resumed run starts mid-epoch: no epoch start comes

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._count_steps(trainer)

    def _count_steps(self, trainer) -> None:
        bar = self.train_progress_bar
        if bar is not None and trainer.max_steps and trainer.max_steps > 0:
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step
            bar.set_description("step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or not trainer.max_steps or trainer.max_steps < 1:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if not bar.disable and (step % self.refresh_rate == 0 or step >= trainer.max_steps):
            bar.n = step
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        step = metrics.pop("loss_step", None)
        if step is not None and "loss" in metrics:
            metrics["loss"] = f"{float(metrics['loss']):.4f} (step {int(float(step))})"
        return metrics
