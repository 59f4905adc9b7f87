"""The progress bar, without a host synchronisation per step.

Lightning's bar shows values given to ``self.log``, read on the host at every step. This bar
shows instead the training loss (median over members) of the last step the timeline flushed,
which the CircuitMetrics callback leaves in ``pl_module.flushed_loss`` when its rows reach the
host anyway. The CLI uses it whenever the progress bar is on and the config names no other.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class FlushedLossBar(TQDMProgressBar):
    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        flushed = getattr(pl_module, "flushed_loss", None)
        if flushed is not None:
            step, loss = flushed
            metrics["loss"] = f"{loss:.4f} (step {step})"
        return metrics
