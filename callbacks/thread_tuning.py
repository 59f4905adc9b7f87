"""ThreadTuning: ``run.threads auto`` on a CPU measures which thread count trains fastest.

Thin: the tuner (devinterp/threads.py: ``ThreadTuner``) times the steps and sets the threads;
this callback ticks it at the start of every training step and prints its one-line summary when
training ends. Added by the CLI for a CPU run with ``run.threads auto`` and one process per node.
"""

from __future__ import annotations

from devinterp.threads import ThreadTuner

import sys

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class ThreadTuning(L.Callback):
    def __init__(self, tuner: ThreadTuner):
        self.tuner = tuner

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int):
        self.tuner.tick()

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print(self.tuner.summary(), file=sys.stderr, flush=True)
