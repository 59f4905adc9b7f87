"""The progress bar, without a host synchronisation per step.

Lightning's bar shows values given to ``self.log``, read on the host at every step. The
TimelineWriter logs, at each flush and only then, the training loss (median over members) of the
last step it flushed as the progress-bar metrics ``loss`` and ``loss_step``, host values already;
this bar shows them as one field, ``loss 2.3456 (step 99)``. The CLI uses it whenever the progress
bar is on and the config names no other.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class FlushedLossBar(TQDMProgressBar):
    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        step = metrics.pop("loss_step", None)
        if step is not None and "loss" in metrics:
            metrics["loss"] = f"{float(metrics['loss']):.4f} (step {int(float(step))})"
        return metrics
