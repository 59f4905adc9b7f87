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


class KillInCommit(L.Callback):
    """Kill the process inside the timeline writer's commit that holds ``step``: after the first
    group's rows are written and flushed to the file, before any is marked committed (the test
    hook for "killed during a commit"; a real kill can land there too, only less predictably)."""

    def __init__(self, step: int, marker: str = "killed"):
        self.step, self.marker = step, marker

    def setup(self, trainer, pl_module, stage: str) -> None:
        from callbacks.timeline_writer import TimelineWriter

        writer = next(c for c in trainer.callbacks if isinstance(c, TimelineWriter))
        marker = Path(trainer.default_root_dir) / self.marker
        write_rows = writer._write_rows

        def write_then_kill(name, steps, values) -> None:
            write_rows(name, steps, values)
            if steps.max() >= self.step and not marker.exists():
                writer.file.flush()  # the rows are on disk, their "committed" count is not
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)

        writer._write_rows = write_then_kill


class KillBeforeSwmr(L.Callback):
    """Kill the process while the timeline is being created: every dataset made and flushed,
    the file not yet switched to SWMR (the window an outside kill hits on a loaded machine)."""

    def __init__(self, marker: str = "killed"):
        self.marker = marker

    def setup(self, trainer, pl_module, stage: str) -> None:
        from callbacks.timeline_writer import TimelineWriter

        writer = next(c for c in trainer.callbacks if isinstance(c, TimelineWriter))
        marker = Path(trainer.default_root_dir) / self.marker

        def flush_then_kill(f) -> None:
            if not marker.exists():
                f.flush()
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            start(f)

        start = writer._start
        writer._start = flush_then_kill
