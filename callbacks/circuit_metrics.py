"""CircuitMetrics: every primitive's circuit read from the weights at every training step.

At the start of step s (weights before the s-th update) the headline metrics (one KL per rule,
devinterp.metrics.weights) are computed under inference_mode; at its end they are joined with the
step's per-member training losses (per primitive; the module's ``training_step`` returns them as
``loss_row``) into one row of the timeline group ``every_step``. Diagnostics run every
``diagnostics_every_n_steps`` steps, or log-spaced (``diagnostics_schedule``, the default; see
devinterp/cadence.py), into the group ``diagnostics``, with the exact attribution of every
rule's logit to the components (devinterp/metrics/attribution.py) in the group ``attribution`` and the
Q/K composition per Q/K pair in the group ``composition``, and for bilinear-MLP models the
top eigenvalues of each MLP's direct-path interaction matrix per rule in the group ``mlp``. Rows go to the
TimelineWriter as they are made, on the model's device; the writer moves them to the host at its
flush and hands the loggers one dict per step made by ``summarize``: per-primitive summaries
(``<primitive>/weight_progress``, median over members of its progress on the blind yardstick,
``schema.pooled_progress``, NaN and so not sent where it is unmeasurable;
``<primitive>/train_loss``), grouped by primitive so W&B shows a section per primitive, and every
metric by its timeline name when ``log_all`` is set.
"""

from __future__ import annotations

import warnings
from typing import get_args

import lightning as L
import numpy as np
import torch

from callbacks.timeline_writer import TimelineGroup, find_writer, last_step_reached
from devinterp.cadence import Cadence, is_due
from devinterp.errors import at_least, one_of
from devinterp.language.reachability import reachability
from devinterp.metrics.attribution import AttributionMetrics, MlpEigenMetrics, RuleAttribution
from devinterp.metrics.weights import Diagnostics, HeadlineMetrics, PairComposition
from devinterp.store.schema import MetricInfo, pooled_progress


def train_infos(label_names: list[str], empty: dict | None = None) -> list[MetricInfo]:
    """Training-loss metrics: total, then one per primitive that can fire (NaN = none of its
    positions in that step's batch; every one NaN at the last step, whose final weights train
    on no batch). A primitive that can never fire (``empty``) has no column."""
    infos = [MetricInfo("train/loss", "train", "all", "all", sparse=True, unit="nats")]
    infos += [
        MetricInfo(f"train_loss/{name}", "train", name, "all", sparse=True, unit="nats")
        for name in label_names[1:]
        if name not in (empty or {})
    ]
    return infos


class CircuitMetrics(L.Callback):
    """Weight-derived metrics every step, training losses with them (timeline producer).

    Args:
        diagnostics_every_n_steps: cadence of the mechanism diagnostics under the
            ``every_n_steps`` schedule (0 = no diagnostics, under either schedule).
        diagnostics_schedule: ``log`` (``per_doubling`` per doubling of the step, from the step
            alone) or ``every_n_steps``.
        log_all: send every metric to the loggers, not only the per-primitive summaries.
        attribution: on the diagnostics cadence, the exact split of every token-level rule's
            centred logit over the direct path, the heads and each head's sources (group
            ``attribution``, devinterp/metrics/attribution.py), where the model has one (attention-only,
            no norm, not softmax) and the language has token-level rules.
    """

    timeline_groups = ("every_step", "diagnostics", "attribution", "composition", "mlp")

    def __init__(
        self,
        diagnostics_every_n_steps: int = 10,
        log_all: bool = False,
        diagnostics_schedule: Cadence = "log",
        per_doubling: int = 16,
        attribution: bool = True,
    ):
        at_least(diagnostics_every_n_steps, 0, "circuits.diagnostics_every_n_steps")
        at_least(per_doubling, 1, "circuits.per_doubling")
        one_of(diagnostics_schedule, get_args(Cadence), "circuits.diagnostics_schedule")
        self.diagnostics_schedule, self.per_doubling = diagnostics_schedule, per_doubling
        self.diagnostics_every_n_steps = diagnostics_every_n_steps
        self.log_all = log_all
        self.attribution_on = attribution
        self.attribution: AttributionMetrics | None = None
        self.pair_composition: PairComposition | None = None
        self.mlp_eigen: MlpEigenMetrics | None = None
        self.headline: HeadlineMetrics | None = None
        self.diagnostics: Diagnostics | None = None
        self._current: torch.Tensor | None = None
        self._on_diagnostics: list = []
        self.last_loss_device: torch.device | None = (
            None  # where the step's losses were (bench/gpu_sync_check.py)
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        writer = find_writer(trainer)
        language = trainer.datamodule.language
        self.headline = HeadlineMetrics(language, pl_module.cfg.n_ctx)
        empty = reachability(language).empty
        self.train = train_infos(pl_module.label_names, empty)
        # loss_row's columns kept: the total, then each primitive that can fire (the start label,
        # never predicted, and empty primitives left out)
        kept = [0] + [i for i, name in enumerate(pl_module.label_names[1:], start=2) if name not in empty]
        self.train_columns = torch.tensor(kept)
        self.infos = self.headline.infos + self.train
        M = pl_module.cfg.n_members
        writer.declare(TimelineGroup("every_step", self.infos, M, summarize=self.summarize))
        cfg = pl_module.cfg
        self.diagnostics = Diagnostics(language, cfg) if self.diagnostics_every_n_steps else None
        # the token-level rules (none for a corpus), shared by the attribution and the MLP groups
        rules = RuleAttribution(language, cfg, self.headline) if self.diagnostics else None
        has_rules = rules is not None and bool(rules.rules)
        self.attribution = (
            AttributionMetrics(language, cfg, rules)
            if has_rules and self.attribution_on and AttributionMetrics.applies(cfg)
            else None
        )
        self.pair_composition = PairComposition(cfg) if self.diagnostics and cfg.n_layers >= 2 else None
        self.mlp_eigen = MlpEigenMetrics(language, cfg, rules=rules) if has_rules and cfg.mlp else None
        # the groups on the diagnostics cadence, each made by a ``compute(model)``
        self._on_diagnostics = [
            (name, metrics)
            for name, metrics in (
                ("diagnostics", self.diagnostics),
                ("attribution", self.attribution),
                ("composition", self.pair_composition),
                ("mlp", self.mlp_eigen),
            )
            if metrics is not None
        ]
        for name, metrics in self._on_diagnostics:
            writer.declare(
                TimelineGroup(
                    name, metrics.infos, M, self.diagnostics_every_n_steps, due=self.diagnostics_due
                )
            )
        self._writer = writer
        # per-primitive summary: which headline rows belong to which primitive
        primitives = sorted({i.primitive for i in self.headline.infos})
        self._summary_primitives = primitives
        self._summary_rows = [
            [r for r, i in enumerate(self.headline.infos) if i.primitive == p] for p in primitives
        ]

    def on_train_start(self, trainer, pl_module) -> None:
        self._final_step = -1
        self.headline.to(pl_module.device)
        for _, metrics in self._on_diagnostics:
            metrics.to(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        with torch.inference_mode():
            self._current = self.headline.compute(pl_module.model)
            if self.diagnostics is not None and self.diagnostics_due(step):
                self._append_diagnostics(step, pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the step these weights and this batch belong to
        losses = outputs["loss_row"]  # (member, 1 + n_labels): total, then start, then primitives
        self.last_loss_device = losses.device
        if self.train_columns.device != losses.device:
            self.train_columns = self.train_columns.to(losses.device)
        train = losses[:, self.train_columns].T  # (1 + primitives that can fire, member)
        self._writer.append("every_step", step, torch.cat([self._current, train.to(self._current.dtype)]))
        if last_step_reached(trainer):
            self._measure_final(trainer, pl_module)

    def _append_diagnostics(self, step: int, model) -> None:
        """A row of every group on the diagnostics cadence."""
        for name, metrics in self._on_diagnostics:
            self._writer.append(name, step, metrics.compute(model))

    def diagnostics_due(self, step: int) -> bool:
        return is_due(step, self.diagnostics_schedule, self.diagnostics_every_n_steps, self.per_doubling)

    def on_train_end(self, trainer, pl_module) -> None:
        self._measure_final(trainer, pl_module)  # a run ended otherwise than by max_steps

    def _measure_final(self, trainer, pl_module) -> None:
        """The final weights get their row too (step ``global_step``, after the last update):
        weight metrics and diagnostics of the final weights, training losses NaN (no batch)."""
        step = trainer.global_step
        if self._final_step == step:
            return
        self._final_step = step
        with torch.inference_mode():
            headline = self.headline.compute(pl_module.model)
            no_batch = headline.new_full((len(self.train), headline.shape[1]), float("nan"))
            self._writer.append("every_step", step, torch.cat([headline, no_batch]))
            self._append_diagnostics(step, pl_module.model)

    def summarize(self, steps: np.ndarray, values: np.ndarray) -> list[dict[str, float]]:
        """Host rows (n,), (n, n_metrics, member) -> one logger dict per step."""
        n_headline = len(self.headline.infos)
        infos = self.headline.infos
        summaries = {  # the primitive's progress on the blind yardstick (a ratio of sums over rules)
            f"{p}/weight_progress": np.median(
                pooled_progress(values[:, rows].swapaxes(0, 1), [infos[r] for r in rows]), axis=-1
            )
            for p, rows in zip(self._summary_primitives, self._summary_rows)
        }
        with warnings.catch_warnings():  # a primitive absent from a step's batch is NaN for all members
            warnings.simplefilter("ignore", RuntimeWarning)
            train = np.nanmedian(values[:, n_headline:], axis=-1)
        summaries["train/loss"] = train[:, 0]
        for column, info in enumerate(self.train[1:], start=1):
            summaries[f"{info.primitive}/train_loss"] = train[:, column]
        rows = []
        for r in range(len(steps)):
            metrics = {k: float(v[r]) for k, v in summaries.items() if np.isfinite(v[r])}
            if self.log_all:
                medians = np.median(values[r], axis=-1)
                metrics.update({i.name: float(v) for i, v in zip(self.infos, medians) if np.isfinite(v)})
            rows.append(metrics)
        return rows
