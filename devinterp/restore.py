"""A trained run rebuilt from what its timeline recorded: its model config, its language, the model
at a weight snapshot. The one place that turns a timeline's ``meta/config`` and
``meta/language_spec`` back into objects (the report, essential dynamics and the LLC use it).

A config field this version does not know is left out, so older timelines still open.
"""

from __future__ import annotations

import torch
import yaml

from devinterp.language import SpecError, parse_language
from devinterp.model import ModelConfig, TensorTransformer
from devinterp.store.timeline import Timeline


def model_config(config_yaml: str, **overrides) -> ModelConfig:
    """The ModelConfig of a run's stored config (its ``model`` section), with ``overrides``
    (e.g. ``n_members`` for a batch of copies)."""
    stored = yaml.safe_load(config_yaml)["model"]
    fields = ModelConfig.__dataclass_fields__
    return ModelConfig(**{**{k: v for k, v in stored.items() if k in fields}, **overrides})


def run_language(timeline: Timeline):
    """The language the run trained on, rebuilt from the spec the timeline keeps; None for a
    corpus's description or a spec this version cannot read."""
    try:
        return parse_language(yaml.safe_load(timeline.meta.get("language_spec", "")) or {})
    except (SpecError, yaml.YAMLError, TypeError, AttributeError):
        return None


def snapshot_model(timeline: Timeline, slot: int) -> tuple[TensorTransformer, int]:
    """(model, step) of weight snapshot ``slot``, every member, in evaluation mode's weights."""
    model = TensorTransformer(model_config(timeline.meta["config"]))
    step, weights = timeline.snapshot(slot)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(weights[name]))
    return model, step
