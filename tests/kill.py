"""A callback that SIGKILLs its own process at a chosen step: the kernel ends the process at
once, exactly as an external ``kill -9`` at that moment would (no Python clean-up runs)."""

import os
import signal
from pathlib import Path

import lightning as L


class KillAt(L.Callback):
    """Kill the process when ``trainer.global_step == step``, at the start or end of the batch.

    ``marker`` is created just before the kill; a run that finds it (the resumed run, which
    reads the same config.yaml) is left alone.
    """

    def __init__(self, step: int, at: str = "batch_start", marker: str = "killed"):
        self.step, self.at, self.marker = step, at, marker

    def _maybe_kill(self, trainer: L.Trainer) -> None:
        marker = Path(trainer.default_root_dir) / self.marker
        if trainer.global_step == self.step and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at == "batch_start":
            self._maybe_kill(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.at == "batch_end":
            self._maybe_kill(trainer)
