"""MechanismInterventions: penalties and clamps on the mechanism over step windows (timeline producer).

The interventions and their conventions are in devinterp/interventions.py, the metrics a
penalty may name in devinterp/metrics/mechanisms.py. Hooks, in the order Lightning calls them in step s:

- ``on_train_start``: clamps active at the first step take hold (a ``frozen`` clamp records
  the weights it holds);
- ``on_after_backward``: each penalty's metric at the step's weights, with grad where active;
  its gradient (weight times the metric's, on the members it acts on) is added to ``.grad``;
- ``on_before_optimizer_step``: the gradient of every held slice is zeroed; the step's row goes
  to the timeline group ``interventions``;
- ``on_train_batch_end`` (after the optimiser step, before the other callbacks read the
  weights): held slices are written back for step s + 1 (a window opening at s + 1 takes hold
  here); a window closing at s + 1 resets its slices' AdamW moments.

Row of the group, per intervention: ``intervention/<name>/value`` (a penalty: the metric's sum
over the heads it selects, before the weight, tracked at every step in or out of its window; a
clamp: the Frobenius norm of the held slices), ``/active`` (1 on the members and steps it acts
on, else 0), ``/grad_norm`` (a penalty: the norm of the gradient it added; a clamp: of the
gradient it removed).
"""

from __future__ import annotations

import fnmatch

import lightning as L
import numpy as np
import torch

from callbacks.timeline_writer import TimelineGroup, find_writer
from devinterp.interventions import (
    Intervention,
    check_against,
    clamp_slices,
    components_of,
    parse_interventions,
)
from devinterp.metrics.mechanisms import PenaltyMetrics
from devinterp.model import TensorTransformer
from devinterp.store.schema import MetricInfo

FIELDS = ("value", "active", "grad_norm")


class MechanismInterventions(L.Callback):
    """Penalties and clamps during training.

    Args:
        interventions: a list of mappings, each ``kind: penalty`` (``metric``, ``weight``,
            ``promote``) or ``kind: clamp`` (``component``, ``hold``: zero | init | frozen), with
            ``name``, ``members``, ``from_step``, ``to_step`` (devinterp/interventions.py).
    """

    timeline_groups = ("interventions",)

    def __init__(self, interventions: list[dict] | None = None):
        self.interventions: list[Intervention] = parse_interventions(interventions)
        self.penalties: PenaltyMetrics | None = None
        self._frozen: dict[str, dict[tuple, torch.Tensor]] = {}  # clamp name -> slice key -> weights
        self._initial: dict[str, torch.Tensor] | None = None  # initial weights, for ``init`` clamps

    # ---- set-up ------------------------------------------------------------------------------

    def check(self, language, cfg, sample_tokens: np.ndarray, max_steps: int | None) -> None:
        """Everything that needs the model and the language; the CLI calls it before the run folder
        exists. ``sample_tokens`` (n, T): the run's own sequences (its probe set), whose adjacent
        token pairs weight the offset metrics."""
        if any(i.kind == "penalty" for i in self.interventions) and self.penalties is None:
            self.penalties = PenaltyMetrics(language, cfg, sample_tokens)
        check_against(self.interventions, cfg, self.penalties, max_steps)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.interventions:
            return
        cfg = pl_module.cfg
        self.check(
            trainer.datamodule.language, cfg, trainer.datamodule.probe.tokens.numpy(), trainer.max_steps
        )
        self.members = {
            i.name: list(range(cfg.n_members)) if i.members is None else list(i.members)
            for i in self.interventions
        }
        self.selected = {  # penalty -> metric names; clamp -> components
            i.name: self.penalties.match(i.metric)
            if i.kind == "penalty"
            else [c for c in components_of(cfg) if fnmatch.fnmatchcase(c, i.component)]
            for i in self.interventions
        }
        self.infos = [
            MetricInfo(f"intervention/{i.name}/{f}", "intervention", "mechanism", i.name)
            for i in self.interventions
            for f in FIELDS
        ]
        self._writer = find_writer(trainer)
        self._writer.declare(
            TimelineGroup("interventions", self.infos, cfg.n_members, summarize=self.summarize)
        )
        if any(i.kind == "clamp" and i.hold == "init" for i in self.interventions):
            fresh = TensorTransformer(cfg, seed=pl_module.hparams.seed)  # member k from seed + k, as trained
            self._initial = {n: p.detach() for n, p in fresh.named_parameters()}

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.interventions:
            return
        if self.penalties is not None:
            self.penalties.to(pl_module.device)
        if self._initial is not None:
            self._initial = {
                n: t.to(pl_module.device, pl_module.model.W_E.dtype) for n, t in self._initial.items()
            }
        M = pl_module.cfg.n_members
        self._member_masks = {  # on the device once: no index tensor built in a step
            i.name: torch.zeros(M, device=pl_module.device).index_fill_(
                0, torch.tensor(self.members[i.name], device=pl_module.device), 1.0
            )
            for i in self.interventions
        }
        # the weights of the first step (a fresh run's, or a resumed run's as restored): later
        # steps' are held by ``on_train_batch_end`` after every update
        for i in self.interventions:
            if i.kind == "clamp" and i.active(trainer.global_step):
                self._hold(i, pl_module.model)

    # ---- clamps ------------------------------------------------------------------------------

    def _slices(self, i: Intervention, cfg):
        for member in self.members[i.name]:
            for component in self.selected[i.name]:
                yield from clamp_slices(cfg, component, i.hold, member)

    @staticmethod
    def _key(s) -> tuple:
        return (s.parameter, str(s.member), str(s.index))

    def _hold(self, i: Intervention, model: TensorTransformer) -> None:
        """Write the held values into the intervention's slices (a ``frozen`` clamp whose window
        opens now first records them; a run resumed inside the window records them again, equal,
        since they were written back after every step)."""
        if i.hold == "frozen" and i.name not in self._frozen:
            self._frozen[i.name] = {
                self._key(s): getattr(model, s.parameter)[s.member][s.index].detach().clone()
                for s in self._slices(i, model.cfg)
            }
        with torch.no_grad():
            for s in self._slices(i, model.cfg):
                target = getattr(model, s.parameter)[s.member][s.index]
                if i.hold == "zero":
                    target.zero_()
                elif i.hold == "init":
                    target.copy_(self._initial[s.parameter][s.member][s.index])
                else:
                    target.copy_(self._frozen[i.name][self._key(s)])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        following = trainer.global_step  # the step the updated weights belong to
        for i in self.interventions:
            if i.kind != "clamp":
                continue
            if i.active(following):
                self._hold(i, pl_module.model)
            elif i.to_step == following:  # released: the slices start afresh in AdamW
                self._reset_moments(i, pl_module, trainer.optimizers[0])

    def _reset_moments(self, i: Intervention, pl_module, optimizer) -> None:
        with torch.no_grad():
            for s in self._slices(i, pl_module.cfg):
                state = optimizer.state.get(getattr(pl_module.model, s.parameter), {})
                for moment in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if moment in state:
                        state[moment][s.member][s.index].zero_()

    # ---- penalties and the row ---------------------------------------------------------------

    def on_after_backward(self, trainer, pl_module) -> None:
        if not self.interventions:
            return
        step, model = trainer.global_step, pl_module.model
        M = model.cfg.n_members
        self._row = torch.zeros(len(self.infos), M, device=model.W_E.device)
        scale = 1.0 / max(1, trainer.accumulate_grad_batches)  # the data loss is scaled the same way
        params = [p for p in model.parameters() if p.requires_grad]
        for n, i in enumerate(self.interventions):
            mask = self._mask(i, step)
            self._row[3 * n + 1] = mask
            if i.kind != "penalty":
                continue
            active = i.active(step)
            with torch.set_grad_enabled(active):
                value = torch.stack(list(self.penalties.values(model, self.selected[i.name]).values())).sum(0)
            self._row[3 * n] = value.detach()
            if not active:
                continue
            grads = torch.autograd.grad((i.weight * scale * mask * value).sum(), params, allow_unused=True)
            squared = torch.zeros(M, device=model.W_E.device)
            for p, g in zip(params, grads):
                if g is None:
                    continue
                p.grad = g if p.grad is None else p.grad + g
                squared = squared + g.detach().flatten(1).pow(2).sum(1)
            self._row[3 * n + 2] = squared.sqrt()

    def _mask(self, i: Intervention, step: int) -> torch.Tensor:
        """(member,): 1 where the intervention acts at this step."""
        mask = self._member_masks[i.name]
        return mask if i.active(step) else torch.zeros_like(mask)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.interventions:
            return
        step, model = trainer.global_step, pl_module.model
        for n, i in enumerate(self.interventions):
            if i.kind != "clamp":
                continue
            held, removed = torch.zeros_like(self._row[0]), torch.zeros_like(self._row[0])
            with torch.no_grad():
                for s in self._slices(i, model.cfg):
                    param = getattr(model, s.parameter)
                    held[s.member] += param[s.member][s.index].pow(2).sum()
                    if i.active(step) and param.grad is not None:
                        grad = param.grad[s.member][s.index]
                        removed[s.member] += grad.pow(2).sum()
                        grad.zero_()
            self._row[3 * n] = held.sqrt()
            self._row[3 * n + 2] = removed.sqrt()
        self._writer.append("interventions", step, self._row)

    # ---- loggers -----------------------------------------------------------------------------

    def summarize(self, steps: np.ndarray, values: np.ndarray) -> list[dict[str, float]]:
        """Per intervention, the median over the members it acts on of value and grad_norm, and the
        share of members active: W&B's section ``intervention``."""
        rows = []
        for r in range(len(steps)):
            metrics = {}
            for n, i in enumerate(self.interventions):
                acted = values[r, 3 * n, self.members[i.name]]
                metrics[f"intervention/{i.name}/value"] = float(np.median(acted))
                metrics[f"intervention/{i.name}/active"] = float(values[r, 3 * n + 1].mean())
                metrics[f"intervention/{i.name}/grad_norm"] = float(
                    np.median(values[r, 3 * n + 2, self.members[i.name]])
                )
            rows.append(metrics)
        return rows
