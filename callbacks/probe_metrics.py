"""ProbeMetrics: the learning curves users look at first.

Every ``every_n_steps`` steps (and at step 0 and the last step) every member is evaluated on
the fixed probe set: per-primitive (and optionally per-rule) excess loss, i.e. the exact
KL(true next-token distribution || model), and accuracy against the Bayes-optimal guess.
Medians over members go to ``trainer.loggers`` as ``probe_excess/<primitive>`` and
``probe_acc/<primitive>``; at the end a table of step 0 against the last step is printed and
written to ``<run folder>/probe_summary.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from devinterp.probe import ProbeResult, evaluate_probe


class ProbeMetrics(L.Callback):
    """Evaluate all members on the shared probe set every ``every_n_steps`` training steps.

    Args:
        every_n_steps: evaluation cadence in optimiser steps (step 0 and the last step always).
        log_rules: also log every rule's excess loss (``probe_excess/<primitive>/<rule>``).
        batch_size: probe sequences per forward pass.
    """

    def __init__(self, every_n_steps: int = 10, log_rules: bool = False, batch_size: int = 64):
        if every_n_steps < 1:
            raise ValueError(f"probe.every_n_steps: must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.log_rules = log_rules
        self.batch_size = batch_size
        self.first: tuple[int, ProbeResult] | None = None
        self.last: tuple[int, ProbeResult] | None = None
        self.summary: dict | None = None

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self.last is not None and self.last[0] == step:
            return
        language = trainer.datamodule.language
        was_training = pl_module.training
        pl_module.eval()
        result = evaluate_probe(pl_module.model, trainer.datamodule.probe, len(language.label_names),
                                len(language.rule_names), self.batch_size)
        pl_module.train(was_training)
        result = ProbeResult(*(t.cpu() for t in (result.excess_by_label, result.accuracy_by_label,
                                                 result.excess_by_rule, result.excess)))
        if self.first is None:
            self.first = (step, result)
        self.last = (step, result)
        self._log(trainer, step, result, language)

    def _log(self, trainer, step: int, result: ProbeResult, language) -> None:
        metrics = {"probe/excess": result.excess.median().item()}
        excess = result.excess_by_label.nanmedian(0).values.tolist()
        accuracy = result.accuracy_by_label.nanmedian(0).values.tolist()
        for name, e, a in zip(language.label_names, excess, accuracy):
            if not math.isnan(e):
                metrics[f"probe_excess/{name}"] = e
                metrics[f"probe_acc/{name}"] = a
        if self.log_rules:
            for name, e in zip(language.rule_names, result.excess_by_rule.nanmedian(0).values.tolist()):
                if not math.isnan(e):
                    metrics[f"probe_excess/{name}"] = e
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_train_start(self, trainer, pl_module) -> None:
        self.first = self.last = None
        self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module)
        self.summary = self.make_summary(trainer.datamodule)
        self._report(trainer)

    def make_summary(self, datamodule) -> dict:
        """Per-primitive excess loss (median over members) at the first and last evaluation."""
        (first_step, first), (last_step, last) = self.first, self.last
        probe = datamodule.probe
        labels = probe.labels[:, 1:]
        rows = {}
        for i, name in enumerate(datamodule.language.label_names):
            share = (labels == i).float().mean().item()
            if share == 0:
                continue
            initial = first.excess_by_label[:, i].nanmedian().item()
            final = last.excess_by_label[:, i].nanmedian().item()
            rows[name] = {
                "share": share,
                "initial": initial,
                "final": final,
                "fall": 1 - final / initial if initial > 0 else float("nan"),
                "final_accuracy": last.accuracy_by_label[:, i].nanmedian().item(),
                "final_by_member": last.excess_by_label[:, i].tolist(),
            }
        return {"first_step": first_step, "last_step": last_step,
                "n_members": int(first.excess.shape[0]), "primitives": rows}

    @rank_zero_only
    def _report(self, trainer) -> None:
        print(format_summary(self.summary))
        path = Path(trainer.default_root_dir) / "probe_summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary, indent=2))

    def state_dict(self) -> dict:
        return {"every_n_steps": self.every_n_steps}


def format_summary(summary: dict) -> str:
    """The end-of-run table: excess loss per primitive at the first and last step."""
    first, last, M = summary["first_step"], summary["last_step"], summary["n_members"]
    lines = [
        f"Excess loss on the probe set (nats per token above the exact loss; median of {M} member"
        f"{'s' if M > 1 else ''})",
        f"{'primitive':<14}{'positions':>10}{f'step {first}':>12}{f'step {last}':>12}{'fall':>8}{'top-1 acc':>11}",
    ]
    for name, row in summary["primitives"].items():
        lines.append(f"{name:<14}{row['share']:>10.1%}{row['initial']:>12.4f}{row['final']:>12.4f}"
                     f"{row['fall']:>8.0%}{row['final_accuracy']:>11.1%}")
    return "\n".join(lines)
