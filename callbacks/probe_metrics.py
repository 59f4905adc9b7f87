"""ProbeMetrics: the learning curves users look at first.

On a log-spaced schedule (devinterp/cadence.py: 16 evaluations per doubling of the step, dense
where onsets happen; or every ``every_n_steps`` steps), at step 0 and at the last step, every
member is evaluated on the fixed probe set shared by all members: per-primitive and per-rule
excess loss, i.e. the exact KL(true next-token distribution || model), accuracy against the
Bayes-optimal guess, the loss at each position, and the in-context-learning score of Olsson et
al. (2022): the loss late in the sequence minus the loss early in it (negative once context
helps). Each excess metric carries the excess of its primitive's blind and knock-out baselines
(devinterp/baselines.py) and the positions it averages over (``mass``). Rows go to the
TimelineWriter as they are made (group ``probe``, one value per member, on the device); at its
flush the writer sends medians over members to ``trainer.loggers`` grouped by primitive
(``<primitive>/probe_excess``, ``<primitive>/probe_acc``, and ``<primitive>/probe_progress`` on
the blind yardstick where it is measurable) through ``summarize``. With ``strategies`` (the
default), the same evaluation fills the group ``strategy``: KL(strategy || model) per primitive
and strategy (devinterp/strategies.py), sent to the loggers as ``strategy_kl/...`` medians. At the end a
table of step 0 against the last step, with each primitive's position count and the standard
error of its excess, is printed and written to ``<run folder>/probe_summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import get_args

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from callbacks.timeline_writer import TimelineGroup, find_writer, last_step_reached
from devinterp.cadence import Cadence, is_due
from devinterp.errors import at_least, one_of
from devinterp.probe import (
    ProbeResult,
    StrategyRows,
    attention_to_open,
    evaluate_probe,
)
from devinterp.probe_catalogue import probe_catalogue
from devinterp.store.schema import MetricInfo, pooled_progress
from devinterp.strategies import STRATEGY_GROUP


class ProbeMetrics(L.Callback):
    """Evaluate all members on the shared probe set, log-spaced or every ``every_n_steps`` steps.

    Args:
        schedule: ``log`` (``per_doubling`` evaluations per doubling of the step; depends on the
            step alone, so a resumed or extended run keeps it) or ``every_n_steps``; step 0 and the
            last step always.
        every_n_steps: the cadence of the ``every_n_steps`` schedule, in optimiser steps.
        log_rules: also send every rule's excess loss to the loggers (the timeline has them always).
        batch_size: probe sequences per forward pass (per member). Small batches keep the
            (member, batch, head, pos, pos) attention tensors in cache: on 2 CPU cores 8 sequences
            at a time evaluated the quickstart's probe set about twice as fast as 64.
        strategies: also record the strategy curves (group ``strategy``; a language's run only).
    """

    timeline_groups = ("probe", STRATEGY_GROUP)

    def __init__(
        self,
        every_n_steps: int = 10,
        log_rules: bool = False,
        batch_size: int = 8,
        schedule: Cadence = "log",
        per_doubling: int = 16,
        strategies: bool = True,
    ):
        at_least(every_n_steps, 1, "probe.every_n_steps")
        at_least(per_doubling, 1, "probe.per_doubling")
        one_of(schedule, get_args(Cadence), "probe.schedule")
        self.schedule, self.per_doubling = schedule, per_doubling
        at_least(batch_size, 1, "probe.batch_size")
        self.every_n_steps = every_n_steps
        self.log_rules = log_rules
        self.batch_size = batch_size
        self.record_strategies = strategies
        self.strategy_table = None  # devinterp/strategies.StrategyTable, when recorded
        self.first: tuple[int, ProbeResult] | None = None
        self.last: tuple[int, ProbeResult] | None = None
        self.summary: dict | None = None
        self.infos: list[MetricInfo] = []
        self.span_opens: torch.Tensor | None = None  # (span primitive, probe sequence, pos)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule, cfg = trainer.datamodule, pl_module.cfg
        found = probe_catalogue(
            datamodule.language, datamodule.probe, datamodule.seq_len, cfg.n_layers, cfg.n_heads
        )
        self.infos, self.has_excess = found.infos, found.has_excess
        self.label_names, self.rule_names = found.label_names, found.rule_names
        self.label_columns, self.rule_columns = found.label_columns, found.rule_columns
        self.icl_early, self.icl_late = found.icl_early, found.icl_late
        self.spans, self.span_opens = found.spans, found.span_opens
        self._writer = find_writer(trainer)
        self._writer.declare(
            TimelineGroup(
                "probe",
                self.infos,
                pl_module.cfg.n_members,
                self.every_n_steps,
                due=self.due,
                summarize=self.summarize,
            )
        )
        table = found.strategies if self.record_strategies else None
        self.strategy_table = table if table is not None and table.infos else None
        if self.strategy_table is not None:
            self._writer.declare(
                TimelineGroup(
                    STRATEGY_GROUP,
                    self.strategy_table.infos,
                    pl_module.cfg.n_members,
                    self.every_n_steps,
                    due=self.due,
                    summarize=self.summarize_strategies,
                )
            )

    def due(self, step: int) -> bool:
        """Whether the schedule evaluates at ``step`` (the last step is evaluated anyway)."""
        return is_due(step, self.schedule, self.every_n_steps, self.per_doubling)

    def values(self, result: ProbeResult, attention: Tensor | None = None) -> dict[str, Tensor]:
        """Every metric of one evaluation by name, (member,) each; ``attention`` (span
        primitive, member, layer, head) from ``attention_to_open``."""
        names, out = self.label_names, {}
        loss = result.loss_by_position  # (M, T-1)
        if self.has_excess:
            out["probe/excess"] = result.excess
            out.update({f"probe_excess/{names[i]}": result.excess_by_label[:, i] for i in self.label_columns})
        out.update({f"probe_acc/{names[i]}": result.accuracy_by_label[:, i] for i in self.label_columns})
        out.update({f"probe_ce/{names[i]}": result.loss_by_label[:, i] for i in self.label_columns})
        if self.has_excess:
            out.update(
                {f"probe_excess/{self.rule_names[i]}": result.excess_by_rule[:, i] for i in self.rule_columns}
            )
        out.update({f"probe_loss/pos{t + 1}": loss[:, t] for t in range(loss.shape[1])})
        out["icl/score"] = loss[:, self.icl_late] - loss[:, self.icl_early]
        for span, primitive in enumerate(self.spans if attention is not None else ()):
            out.update(
                {
                    f"probe_attn/{primitive.name}/L{layer}H{head}": attention[span, :, layer, head]
                    for layer in range(attention.shape[2])
                    for head in range(attention.shape[3])
                }
            )
        return out

    def row(self, values: dict[str, Tensor]) -> Tensor:
        """(n_metrics, member) in the order of ``infos``; every declared metric, no other."""
        names = [i.name for i in self.infos]
        if set(values) != set(names):
            raise ValueError(
                f"probe row: computed {sorted(set(values) - set(names))[:3]} not declared, "
                f"declared {sorted(set(names) - set(values))[:3]} not computed"
            )
        return torch.stack([values[name] for name in names])

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate on the device; the row waits there for the next timeline commit."""
        step = trainer.global_step
        if self.last is not None and self.last[0] == step:
            return
        language = trainer.datamodule.language
        was_training = pl_module.training
        pl_module.eval()
        result = evaluate_probe(
            pl_module.model,
            self._probe,
            len(language.label_names),
            len(language.rule_names),
            self.batch_size,
            self._strategy_rows,
        )
        pl_module.train(was_training)
        result = result.apply(lambda v: v.float())
        if self.first is None:
            self.first = (step, result)
        self.last = (step, result)
        attention = None
        if self.span_opens is not None:
            attention = attention_to_open(
                pl_module.model, self._probe.tokens[:, :-1], self.span_opens, self.batch_size
            )
        self._writer.append("probe", step, self.row(self.values(result, attention)))
        if result.strategy_kl is not None:
            self._writer.append(STRATEGY_GROUP, step, result.strategy_kl.T)

    def summarize(self, steps: np.ndarray, values: np.ndarray) -> list[dict[str, float]]:
        """Host rows (n,), (n, n_metrics, member) -> one logger dict per step."""
        return [self._logged(row) for row in values]

    def summarize_strategies(self, steps: np.ndarray, values: np.ndarray) -> list[dict[str, float]]:
        """The strategy group's host rows -> one logger dict per step: the median over members
        of each ``strategy_kl/<primitive>/<strategy>``."""
        names = self.strategy_table.names
        return [dict(zip(names, np.median(row, axis=-1).tolist())) for row in values]

    def _logged(self, row: np.ndarray) -> dict[str, float]:
        medians = np.median(row, axis=-1)
        metrics = {"probe/excess": float(medians[0])} if self.has_excess else {}
        for info, value in zip(self.infos, medians):
            kind = info.name.split("/")[0]
            if (
                kind in ("probe_excess", "probe_acc", "probe_ce")
                and info.rule == "all"
                and info.primitive != "all"
            ):
                metrics[f"{info.primitive}/{kind}"] = float(value)
                if kind == "probe_excess" and info.is_progress:  # blind; NaN (unmeasurable): not sent
                    reached = float(pooled_progress(np.array([value]), [info]))
                    if np.isfinite(reached):
                        metrics[f"{info.primitive}/probe_progress"] = reached
            elif kind == "probe_excess" and self.log_rules:
                metrics[info.name] = float(value)
        names = [info.name for info in self.infos]
        metrics["icl/score"] = float(medians[names.index("icl/score")])
        best: dict[str, float] = {}  # the head attending most to the open, per span primitive
        for info, value in zip(self.infos, medians):
            if info.kind == "probe_attention" and np.isfinite(value):
                best[info.primitive] = max(best.get(info.primitive, 0.0), float(value))
        metrics.update({f"{name}/attn_to_open": value for name, value in best.items()})
        return metrics

    def state_dict(self) -> dict:
        """The first evaluation, so a resumed run's summary still starts at step 0."""
        if self.first is None:
            return {}
        step, result = self.first
        result = result.apply(lambda v: v.cpu().clone())
        return {"first_step": step, "first": [getattr(result, f.name) for f in fields(result)]}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._restored_first = (int(state_dict["first_step"]), ProbeResult(*state_dict["first"]))

    def on_train_start(self, trainer, pl_module) -> None:
        self._probe = trainer.datamodule.probe.to(pl_module.device)  # moved once, not per evaluation
        self._strategy_rows = (
            None
            if self.strategy_table is None
            else StrategyRows.of(self.strategy_table, len(self._probe.tokens), pl_module.device)
        )
        restored = getattr(self, "_restored_first", None) if trainer.global_step > 0 else None
        if restored is not None:
            restored = (restored[0], restored[1].apply(lambda v: v.to(pl_module.device)))
        self.first, self.last = restored, None
        if self.due(trainer.global_step):  # step 0; a resumed run keeps the schedule
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.due(trainer.global_step) or last_step_reached(trainer):  # the final weights, before
            self._evaluate(trainer, pl_module)  # the last step's checkpoint (see last_step_reached)

    def on_train_end(self, trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module)
        self.summary = self.make_summary(trainer.datamodule)
        self._report(trainer)

    def make_summary(self, datamodule) -> dict:
        """Per-primitive excess loss (median over members) at the first and last evaluation."""
        (first_step, first), (last_step, last) = self.first, self.last
        first, last = (r.apply(lambda v: v.cpu()) for r in (first, last))
        labels = datamodule.probe.labels[:, 1:]
        rows = {}
        measure = (
            "cross_entropy"
            if not self.has_excess
            else "excess"
            if datamodule.probe.true_next is not None
            else "sampled_excess"
        )
        for i in self.label_columns:
            name = datamodule.language.label_names[i]
            first_values, last_values = (
                (r.excess_by_label if self.has_excess else r.loss_by_label)[:, i] for r in (first, last)
            )
            initial, final = first_values.median().item(), last_values.median().item()
            n = int((labels == i).sum())
            se = float("nan")
            if self.has_excess and last.excess_sq_by_label is not None and n > 1:
                spread = (last.excess_sq_by_label[:, i] - last.excess_by_label[:, i].square()).clamp_min(0)
                se = (spread * n / (n - 1) / n).sqrt().median().item()  # of the mean over positions
            rows[name] = {
                "share": (labels == i).float().mean().item(),
                "positions": n,
                "final_se": se,
                "initial": initial,
                "final": final,
                "fall": 1 - final / initial if initial > 0 else float("nan"),
                "final_accuracy": last.accuracy_by_label[:, i].median().item(),
                "final_by_member": last_values.tolist(),
            }
        return {
            "first_step": first_step,
            "last_step": last_step,
            "measure": measure,
            "n_members": int(first.excess.shape[0]),
            "primitives": rows,
        }

    @rank_zero_only
    def _report(self, trainer) -> None:
        print(format_summary(self.summary))
        path = Path(trainer.default_root_dir) / "probe_summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary, indent=2))


def format_summary(summary: dict) -> str:
    """The end-of-run table: excess loss per primitive at the first and last step."""
    first, last, M = summary["first_step"], summary["last_step"], summary["n_members"]
    members = f"median of {M} member{'s' if M > 1 else ''}"
    title = {
        "excess": f"Excess loss on the probe set (nats per token above the exact loss; {members})",
        "sampled_excess": f"Excess loss on the held-out probe set (the model's loss on the next token minus "
        f"the corpus's -log p of it; {members})",
        "cross_entropy": f"Cross-entropy on the held-out probe set (nats per token; no logp, so no "
        f"excess loss; top-1 against the next token; {members})",
    }
    lines = [
        title[summary.get("measure", "excess")],
        f"{'primitive':<14}{'positions':>16}{f'step {first}':>12}{f'step {last}':>12}{'+-SE':>8}"
        f"{'fall':>8}{'top-1 acc':>11}",
    ]
    for name, row in summary["primitives"].items():
        count = f"{row.get('positions', 0)} ({row['share']:.1%})"
        se = row.get("final_se", float("nan"))
        lines.append(
            f"{name:<14}{count:>16}{row['initial']:>12.4f}{row['final']:>12.4f}{se:>8.4f}"
            f"{row['fall']:>8.0%}{row['final_accuracy']:>11.1%}"
        )
    rare = [name for name, row in summary["primitives"].items() if 0 < row.get("positions", 100) < 100]
    if rare:
        lines.append(
            f"fewer than 100 probe positions: {', '.join(rare)}; their excess is noisy "
            "(raise --data.probe_min_positions or --data.probe_size)"
        )
    return "\n".join(lines)
