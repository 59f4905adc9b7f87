"""CircuitMetrics: every primitive's circuit read from the weights at every training step.

At the start of step s (weights before the s-th update) the headline metrics (one KL per rule,
devinterp.metrics) are computed under inference_mode; at its end they are joined with the
step's per-member training losses (per primitive) into one row, kept in a buffer on the model's
device. Diagnostics run every ``diagnostics_every_n_steps`` steps into their own buffer. Every
``flush_every_n_steps`` steps (and at every timeline commit) the buffers move to the host in one
transfer (``hand_over``) and go to the
TimelineWriter (groups ``every_step`` and ``diagnostics``) and, at its commit, to
``trainer.loggers`` as one dict per step: per-primitive summaries (``<primitive>/weight_progress``, median over members of
the mean progress over its rules; ``<primitive>/train_loss``), grouped by primitive so W&B shows
a section per primitive, and every metric by its timeline name when ``log_all`` is set.
"""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import torch

from callbacks.timeline_writer import NonFiniteMetricError, find_writer, log_metrics
from devinterp.errors import at_least
from devinterp.metrics import Diagnostics, HeadlineMetrics, MetricInfo


def train_infos(label_names: list[str]) -> list[MetricInfo]:
    """Training-loss metrics: total, then one per primitive (NaN = none of its positions in
    that step's batch)."""
    infos = [MetricInfo("train/loss", "train", "all", "all")]
    infos += [MetricInfo(f"train_loss/{name}", "train", name, "all", sparse=True) for name in label_names[1:]]
    return infos


class CircuitMetrics(L.Callback):
    """Weight-derived metrics every step, training losses with them, buffered on the device.

    Args:
        diagnostics_every_n_steps: cadence of the mechanism diagnostics (0 = off).
        flush_every_n_steps: rows move to the host, the timeline and the loggers this often.
        log_all: send every metric to the loggers, not only the per-primitive summaries.
    """

    def __init__(self, diagnostics_every_n_steps: int = 10, flush_every_n_steps: int = 100, log_all: bool = False):
        at_least(flush_every_n_steps, 1, "circuits.flush_every_n_steps")
        at_least(diagnostics_every_n_steps, 0, "circuits.diagnostics_every_n_steps")
        self.diagnostics_every_n_steps = diagnostics_every_n_steps
        self.flush_every_n_steps = flush_every_n_steps
        self.log_all = log_all
        self.headline: HeadlineMetrics | None = None
        self.diagnostics: Diagnostics | None = None
        self._rows: list[tuple[int, torch.Tensor]] = []  # (step, (n_metrics, member)) on device
        self._diagnostic_rows: list[tuple[int, torch.Tensor]] = []
        self._current: torch.Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        language = trainer.datamodule.language
        self.headline = HeadlineMetrics(language, pl_module.cfg.n_ctx)
        self.train = train_infos(pl_module.label_names)
        self.infos = self.headline.infos + self.train
        if self.diagnostics_every_n_steps:
            self.diagnostics = Diagnostics(language, pl_module.cfg)
        writer = find_writer(trainer)
        if writer is not None:
            writer.declare("every_step", self.infos, pl_module.cfg.n_members)
            if self.diagnostics is not None:
                writer.declare("diagnostics", self.diagnostics.infos, pl_module.cfg.n_members,
                              self.diagnostics_every_n_steps)
        # per-primitive summary: which headline rows belong to which primitive
        primitives = sorted({i.primitive for i in self.headline.infos})
        self._summary_primitives = primitives
        self._summary_rows = [[r for r, i in enumerate(self.headline.infos) if i.primitive == p] for p in primitives]
        self._nothing = np.array([i.nothing for i in self.headline.infos])

    def on_train_start(self, trainer, pl_module) -> None:
        self.headline.to(pl_module.device)
        if self.diagnostics is not None:
            self.diagnostics.to(pl_module.device)
        self._rows.clear()
        self._diagnostic_rows.clear()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        with torch.inference_mode():
            self._current = self.headline.compute(pl_module.model)
            if self.diagnostics is not None and step % self.diagnostics_every_n_steps == 0:
                self._diagnostic_rows.append((step, self.diagnostics.compute(pl_module.model)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the step these weights and this batch belong to
        losses = pl_module.last_loss_row  # (member, 1 + n_labels): total, then start, then primitives
        train = torch.cat([losses[:, :1], losses[:, 2:]], 1).T  # drop the never-predicted start label
        self._rows.append((step, torch.cat([self._current, train.to(self._current.dtype)])))
        if trainer.global_step % self.flush_every_n_steps == 0:
            self.flush(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.flush(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        try:  # a non-finite value here is already the reason the run stops
            self.hand_over(trainer)
        except NonFiniteMetricError:
            pass

    def flush(self, trainer: L.Trainer) -> None:
        """Hand the buffered rows over and commit them (the writer's commit asks every producer)."""
        writer = find_writer(trainer)
        if writer is not None:
            writer.commit()
        else:
            self.hand_over(trainer)

    def hand_over(self, trainer: L.Trainer) -> None:
        """Move buffered rows to the host (one transfer per buffer), to the writer and the loggers."""
        blocks = {}
        for group, rows in (("every_step", self._rows), ("diagnostics", self._diagnostic_rows)):
            if rows:
                steps = np.array([s for s, _ in rows], dtype=np.int64)
                blocks[group] = (steps, torch.stack([v for _, v in rows]).float().cpu().numpy())  # (n, metrics, M)
                rows.clear()
        if "every_step" in blocks:
            self._log(trainer, *blocks["every_step"])
        writer = find_writer(trainer)
        if writer is not None:
            for group, (steps, values) in blocks.items():
                writer.append(group, steps, values)

    def replay_logs(self, trainer: L.Trainer, group: str, steps: np.ndarray, values: np.ndarray) -> None:
        """Send timeline rows (n, n_metrics, member) to the loggers again (a resume fills the
        steps a killed run's W&B writer lost)."""
        if group == "every_step":
            self._log(trainer, steps, values)

    def _log(self, trainer: L.Trainer, steps: np.ndarray, values: np.ndarray) -> None:
        n_headline = len(self.headline.infos)
        progress = 1 - values[:, :n_headline] / self._nothing[None, :, None]  # (n, n_headline, M)
        summaries = {f"{p}/weight_progress": np.median(progress[:, rows].mean(1), axis=-1)
                     for p, rows in zip(self._summary_primitives, self._summary_rows)}
        with warnings.catch_warnings():  # a primitive absent from a step's batch is NaN for all members
            warnings.simplefilter("ignore", RuntimeWarning)
            train = np.nanmedian(values[:, n_headline:], axis=-1)
        summaries["train/loss"] = train[:, 0]
        if np.isfinite(train[-1, 0]):
            trainer.lightning_module.flushed_loss = (int(steps[-1]), float(train[-1, 0]))
        for column, info in enumerate(self.train[1:], start=1):
            summaries[f"{info.primitive}/train_loss"] = train[:, column]
        for r, step in enumerate(steps.tolist()):
            metrics = {k: float(v[r]) for k, v in summaries.items() if np.isfinite(v[r])}
            if self.log_all:
                medians = np.median(values[r], axis=-1)
                metrics.update({i.name: float(v) for i, v in zip(self.infos, medians) if np.isfinite(v)})
            log_metrics(trainer, step, metrics)
