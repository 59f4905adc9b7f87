"""Interventions on the mechanism during training: penalties and clamps over a step window.

Suppressing a mechanism while the model trains, and seeing what then fails to form, is causal
evidence that a later capability needs it (Chen et al. 2024, "Sudden drops in the loss: syntax
acquisition, phase transitions, and simplicity bias in MLMs", arXiv 2309.07311, who also
release the suppression; Singh et al. 2024, "What needs to go right for an induction head?",
arXiv 2404.07129, who clamp parts of the circuit). Conventions, stated once:

- Every intervention acts at the steps ``from_step <= s < to_step`` (``to_step`` None: to the
  end) on the members it lists (None: all). Members differ freely, so one run can hold its
  own control.
- ``penalty``: ``weight * sum of the named metrics`` (devinterp/metrics/mechanisms.py, a glob selecting
  heads) is added to each chosen member's loss. Its gradient is added to the parameters' after
  the data loss's backward pass, which is the same as adding it to the loss (and stays out of
  the recorded training loss). A negative weight promotes the metric and must be asked for
  with ``promote: true``.
- ``clamp``: the component (``L<l>H<h>``: one head's W_Q, W_K, W_V, W_O slices; ``L<l>/mlp``;
  ``embed``; ``unembed``; globs allowed) is held: ``zero`` holds its output at zero (the head's
  W_O, the MLP's W_out, or the matrix itself), ``init`` holds its weights at their initial
  values, ``frozen`` at their values when the window opens. Parameters are stacked over members,
  layers and heads, so a slice cannot stop its own gradient: its gradient is zeroed before the
  optimiser step (so it adds nothing to clipping norms or AdamW's moments), the slice is
  written back after every step (fused AdamW's weight decay still moves a zero-gradient slice),
  and its AdamW moments are reset to zero when the window closes.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields

from devinterp.errors import UsageError

KINDS = ("penalty", "clamp")
HOLDS = ("zero", "init", "frozen")


@dataclass(frozen=True)
class Intervention:
    name: str
    kind: str
    metric: str = ""  # penalty: a glob over devinterp.metrics.mechanisms.PenaltyMetrics.names
    weight: float = 0.0  # penalty
    promote: bool = False  # penalty: allow a negative weight
    component: str = ""  # clamp: a glob over components_of(cfg)
    hold: str = "zero"  # clamp
    members: tuple[int, ...] | None = None
    from_step: int = 0
    to_step: int | None = None

    def active(self, step: int) -> bool:
        return self.from_step <= step and (self.to_step is None or step < self.to_step)


def parse_interventions(
    items: list[dict] | None, field_name: str = "mechanism.interventions"
) -> list[Intervention]:
    """Config entries (dicts from YAML or the CLI) -> interventions, every mistake one line
    naming the entry and field. Names default to ``<kind>-<index>`` and must be unique."""
    known = {f.name for f in fields(Intervention)}
    out: list[Intervention] = []
    for index, item in enumerate(items or []):
        where = f"{field_name}[{index}]"
        if not isinstance(item, dict):
            raise UsageError(f"{where}: expected a mapping (kind, metric or component, ...), got {item!r}")
        unknown = sorted(set(item) - known)
        if unknown:
            raise UsageError(f"{where}.{unknown[0]}: unknown field (fields: {', '.join(sorted(known))})")
        kind = item.get("kind")
        if kind not in KINDS:
            raise UsageError(f"{where}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        values = dict(item)
        values.setdefault("name", f"{kind}-{index}")
        if not isinstance(values["name"], str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", values["name"]):
            raise UsageError(f"{where}.name: letters, digits, _ . - only, got {values['name']!r}")
        for key in ("from_step", "to_step"):
            value = values.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise UsageError(f"{where}.{key}: must be a step (an integer >= 0), got {value!r}")
        if values.get("to_step") is not None and values["to_step"] <= values.get("from_step", 0):
            start = values.get("from_step", 0)
            raise UsageError(f"{where}.to_step: must be after from_step ({start}), got {values['to_step']}")
        members = values.get("members")
        if members is not None:
            if (
                not isinstance(members, list)
                or not members
                or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in members)
            ):
                raise UsageError(f"{where}.members: a non-empty list of member indices, got {members!r}")
            values["members"] = tuple(sorted(set(members)))
        if kind == "penalty":
            if not isinstance(values.get("metric"), str) or not values["metric"]:
                raise UsageError(f"{where}.metric: a penalty needs the metric (a name or glob) to penalise")
            weight = values.get("weight")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight != weight:
                raise UsageError(f"{where}.weight: a penalty needs a number, got {weight!r}")
            if weight < 0 and values.get("promote") is not True:
                raise UsageError(
                    f"{where}.weight: negative ({weight}) promotes the metric; say so with promote: true"
                )
            values["weight"] = float(weight)
            for key in ("component", "hold"):
                if key in item:
                    raise UsageError(f"{where}.{key}: only a clamp has a {key}")
        else:
            if not isinstance(values.get("component"), str) or not values["component"]:
                raise UsageError(f"{where}.component: a clamp needs the component (e.g. L0H1, L1/mlp)")
            if values.get("hold", "zero") not in HOLDS:
                raise UsageError(f"{where}.hold: must be one of {', '.join(HOLDS)}, got {values['hold']!r}")
            for key in ("metric", "weight", "promote"):
                if key in item:
                    raise UsageError(f"{where}.{key}: only a penalty has a {key}")
        out.append(Intervention(**values))
    names = [i.name for i in out]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UsageError(f"{field_name}: two interventions are named {duplicate!r}")
    return out


def components_of(cfg) -> list[str]:
    """Every component a clamp can name, for a model config."""
    names = [f"L{layer}H{h}" for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    if cfg.mlp:
        names += [f"L{layer}/mlp" for layer in range(cfg.n_layers)]
    return names + ["embed", "unembed"]


@dataclass(frozen=True)
class Slice:
    """One parameter's slice for one member: ``parameter[member][index]``."""

    parameter: str
    member: int
    index: tuple = field(default_factory=tuple)


def clamp_slices(cfg, component: str, hold: str, member: int) -> list[Slice]:
    """The parameter slices a clamp of ``component`` holds (``zero``: the output matrix only)."""
    head = re.fullmatch(r"L(\d+)H(\d+)", component)
    mlp = re.fullmatch(r"L(\d+)/mlp", component)
    if head:
        layer, h = int(head[1]), int(head[2])
        slices = {
            "W_Q": (layer, slice(None), h),
            "W_K": (layer, slice(None), h),
            "W_V": (layer, h),
            "W_O": (layer, h),
        }
        output = "W_O"
    elif mlp:
        layer = int(mlp[1])
        slices = {"W_in": (layer,), "W_gate": (layer,), "W_out": (layer,)}
        output = "W_out"
    else:
        slices = {"embed": {"W_E": ()}, "unembed": {"W_U": ()}}[component]
        output = next(iter(slices))
    if hold == "zero":
        slices = {output: slices[output]}
    return [Slice(name, member, index) for name, index in slices.items()]


def check_against(interventions: list[Intervention], cfg, penalties, max_steps: int | None) -> None:
    """What needs the model and the language (``penalties``: a devinterp.metrics.mechanisms.PenaltyMetrics
    of the run, None without penalties): members, components, metric names, steps."""
    for index, i in enumerate(interventions):
        where = f"mechanism.interventions[{index}]"
        if i.members is not None and max(i.members) >= cfg.n_members:
            raise UsageError(
                f"{where}.members: member {max(i.members)} does not exist (model.n_members {cfg.n_members})"
            )
        if max_steps is not None and max_steps >= 0 and i.from_step >= max_steps:
            raise UsageError(f"{where}.from_step: {i.from_step} is past trainer.max_steps {max_steps}")
        if i.kind == "clamp":
            if not [c for c in components_of(cfg) if fnmatch.fnmatchcase(c, i.component)]:
                raise UsageError(
                    f"{where}.component: {i.component!r} names no component of this model "
                    f"({', '.join(components_of(cfg)[:3])}, ...: {cfg.n_layers} layers x {cfg.n_heads} heads"
                    f"{', mlp' if cfg.mlp else ''})"
                )
        elif not penalties.match(i.metric):
            raise UsageError(f"{where}.metric: {i.metric!r} {penalties.why_not(i.metric)}")
