"""The tracking path makes no host synchronisation per step (issue: Speed and scale).

Every way a tensor reaches the host (``.item()``, ``float()``, ``int()``, ``bool()``,
``.tolist()``, ``.numpy()``, ``.cpu()``, ``.to("cpu")``) is counted between one step's start and
the next's, with weight metrics every step, diagnostics, probes, snapshots, the timeline writer
and the progress bar on. Only flush steps may read values. The bar shows values the writer
logged as host tensors at a flush; Lightning turns them into numbers every step (no device read),
which is not counted either. On CPU a ``.to(device)`` that places data on the model's device
looks like a move to the host; Lightning's ``move_data_to_device`` (the input batch, and values
given to ``self.log``) is that placement and is not counted.
"""

import collections
import traceback

import lightning as L
import numpy as np
import pytest
import torch

from analysis import load_timeline
from callbacks import CircuitMetrics, ProbeMetrics, TimelineWriter
from callbacks.progress_bar import FlushedLossBar

HOST_READS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu")


class StepWindow(L.Callback):
    """Attributes everything from one step's start to the next step's start to that step."""

    def __init__(self):
        self.step = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.step = None


@pytest.fixture
def host_reads(monkeypatch):
    window = StepWindow()
    reads = collections.defaultdict(list)  # step -> [(how, where)]

    def counted(name, original, only_to_host=False):
        def method(self, *args, **kwargs):
            if window.step is not None:
                target = args[0] if args else kwargs.get("device")
                to_host = not only_to_host or (
                    isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"
                )
                stack = traceback.extract_stack(limit=20)[:-1]
                # placement on the model's device; and the progress bar's values, logged at a flush
                # as host tensors, which Lightning converts to numbers at every step
                placement = any(
                    frame.name in ("move_data_to_device", "convert_tensors_to_scalars") for frame in stack
                )
                if to_host and not placement:
                    reads[window.step].append((name, " < ".join(f.name for f in reversed(stack[-12:]))))
            return original(self, *args, **kwargs)

        return method

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.Tensor, "to", counted("to", torch.Tensor.to, only_to_host=True))
    return window, reads


def test_tracked_training_steps_read_nothing_on_the_host_between_flushes(tmp_path, host_reads, tiny_run):
    window, reads = host_reads
    flush, max_steps = 10, 30
    callbacks = [
        window,
        CircuitMetrics(diagnostics_every_n_steps=3, diagnostics_schedule="every_n_steps"),
        ProbeMetrics(every_n_steps=5, schedule="every_n_steps"),
        TimelineWriter(flush_every_n_steps=flush, n_snapshots=8),
        FlushedLossBar(),
    ]
    options = {"enable_progress_bar": True, "log_every_n_steps": 1}
    trainer, module, _ = tiny_run(max_steps, callbacks, options)

    # the check itself must see reads: at flushes and at the end
    assert reads[flush - 1] and reads[2 * flush - 1] and reads[max_steps - 1]
    quiet = [s for s in range(max_steps - 1) if (s + 1) % flush and s != 0]
    assert len(quiet) >= 20
    loud = {s: reads[s] for s in quiet if reads[s]}
    assert not loud, loud
    # snapshots, probes and diagnostics all ran in the quiet steps
    timeline = load_timeline(tmp_path / "timeline.h5")
    assert (
        len(timeline.steps("probe")) == 7 and len(timeline.steps("diagnostics")) == 11
    )  # every 3rd, and the final weights
    # the bar shows the loss of the last flushed step, set at that flush from host values
    bar = trainer.progress_bar_callback.get_metrics(trainer, module)
    loss = np.nanmedian(timeline.values("train/loss")[-2])  # the last row: final weights, no batch
    assert bar["loss"] == f"{loss:.4f} (step {max_steps - 1})", bar
