"""Units of a pooled analysis: which (run, member) pairs are independent models.

Member k of a run trains from seed ``model.seed + k`` (initialisation, and its data stream unless
``data.share_data``), so two runs pooled together can hold the same model twice: two runs with
the same seed share every member, and 4-member runs with seeds 0 and 1 share three. A unit is
identified by what reaches its gradient: the member's initialisation seed and stream seed, the
language spec, and every setting of the model, data, mechanism and trainer sections that changes
a step's update (not threads, logging, probe, timeline, checkpoint or the compute layout, and
not the run's length unless the learning rate's schedule depends on it). A second check catches
what the config cannot show: members whose first training losses are equal bit for bit are the
same model too. A unit met again is counted once, and the report names every such member.

Runs of different lengths are read to the shortest: an onset after the shortest pooled horizon is
censored at it, so "never learned" means the same thing in every unit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import yaml

from analysis.onset import Onset
from devinterp.store.timeline import Timeline

# settings that never reach the gradient: how the step is computed, what is measured and logged
COMPUTE_ONLY = {
    "model": {"n_members", "seed", "compile", "members_per_pass", "linear_chunk"},
    "data": {"num_workers", "probe_size", "probe_seed", "probe_min_positions", "language", "corpus"},
    "trainer": {
        "accelerator", "devices", "num_nodes", "strategy", "default_root_dir", "callbacks", "logger",
        "enable_checkpointing", "enable_progress_bar", "enable_model_summary", "log_every_n_steps",
        "profiler", "limit_val_batches", "check_val_every_n_epoch", "num_sanity_val_steps",
        "val_check_interval", "max_time", "benchmark", "deterministic", "barebones", "max_epochs",
        "min_epochs", "min_steps", "enable_autolog_hparams", "model_registry", "inference_mode",
        "limit_predict_batches", "limit_test_batches", "detect_anomaly", "plugins", "fast_dev_run",
        "use_distributed_sampler", "sync_batchnorm", "reload_dataloaders_every_n_epochs", "max_steps",
    },
}  # fmt: skip
GRADIENT_SECTIONS = ("model", "data", "mechanism", "trainer", "optimizer", "lr_scheduler")
FINGERPRINT_STEPS = 8  # first training losses compared bit for bit


@dataclass(frozen=True)
class Unit:
    run: str  # the run's folder (or file) name
    member: int
    key: str  # hash of what reaches the gradient, seeds included
    fingerprint: tuple[float, ...]  # the first training losses (empty where there are none)


@dataclass(frozen=True)
class Pool:
    """Which members of each pooled run count, and what was left out and why."""

    keep: dict[int, list[int]]  # index of the timeline -> members counted
    repeats: list[tuple[Unit, Unit]]  # (unit left out, the unit it repeats)
    horizon: float  # the shortest pooled run's last step: later onsets are censored there
    horizons: dict[str, float]  # run -> its last step


def gradient_settings(config: dict) -> dict:
    """The config's sections that reach the gradient, without what never does."""
    found = {}
    for section in GRADIENT_SECTIONS:
        value = config.get(section)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in COMPUTE_ONLY.get(section, set())}
        found[section] = value
    model = config.get("model") or {}
    if model.get("schedule", "constant") != "constant":  # the schedule's length changes every step
        found["max_steps"] = (config.get("trainer") or {}).get("max_steps")
    return found


def units_of(timeline: Timeline) -> list[Unit]:
    """Every member of a run as a unit."""
    config = yaml.safe_load(timeline.meta.get("config", "")) or {}
    seed = int((config.get("model") or {}).get("seed") or 0)
    share = bool((config.get("data") or {}).get("share_data"))
    common = json.dumps(
        {"spec": timeline.meta.get("language_spec", ""), "settings": gradient_settings(config)},
        sort_keys=True,
        default=str,
    )
    try:
        losses = timeline.values("train/loss")  # (steps, members)
    except KeyError:
        losses = np.zeros((0, timeline.n_members))
    units = []
    for member in range(timeline.n_members):
        seeds = {"init": seed + member, "stream": seed if share else seed + member}
        key = hashlib.sha256((common + json.dumps(seeds)).encode()).hexdigest()[:16]
        first = losses[:, member][np.isfinite(losses[:, member])][:FINGERPRINT_STEPS]
        fingerprint = tuple(float(x) for x in first) if len(first) == FINGERPRINT_STEPS else ()
        units.append(Unit(timeline.run_name, member, key, fingerprint))
    return units


def pool_units(timelines: list[Timeline]) -> Pool:
    """Each unit once, in the order given (the first run met keeps it)."""
    keep: dict[int, list[int]] = {}
    seen_keys: dict[str, Unit] = {}
    seen_prints: dict[tuple[float, ...], Unit] = {}
    repeats = []
    for index, timeline in enumerate(timelines):
        keep[index] = []
        for unit in units_of(timeline):
            earlier = seen_keys.get(unit.key)
            if earlier is None and unit.fingerprint:
                earlier = seen_prints.get(unit.fingerprint)
            if earlier is not None:
                repeats.append((unit, earlier))
                continue
            seen_keys[unit.key] = unit
            if unit.fingerprint:
                seen_prints[unit.fingerprint] = unit
            keep[index].append(unit.member)
    horizons = {t.run_name: float(t.last_step) for t in timelines}
    return Pool(keep, repeats, min(horizons.values()), horizons)


def censor_at(onsets: list[Onset], horizon: float) -> list[Onset]:
    """Onsets after ``horizon`` become censored there (the run that ends first could not see them)."""
    return [
        o
        if o.censored or o.step <= horizon
        else Onset(o.metric, o.member, horizon, horizon, horizon, True, o.method)
        for o in onsets
    ]


def pool_text(pool: Pool) -> list[str]:
    """The report's lines on the pool: repeats left out, and the common horizon."""
    lines = []
    if pool.repeats:
        shown = ", ".join(
            f"{u.run} member {u.member} (= {e.run} member {e.member})" for u, e in pool.repeats[:8]
        )
        more = f" and {len(pool.repeats) - 8} more" if len(pool.repeats) > 8 else ""
        lines.append(
            f"**{len(pool.repeats)} repeated units counted once**: {shown}{more}. A member trains from seed "
            "model.seed + k (initialisation and data), so runs whose seeds overlap share members; these "
            "have the same seeds, language and every setting that reaches the gradient, or the same "
            f"first {FINGERPRINT_STEPS} training losses bit for bit."
        )
    if len(set(pool.horizons.values())) > 1:
        runs = ", ".join(f"{run} {step:.0f}" for run, step in pool.horizons.items())
        lines.append(
            f"The pooled runs end at different steps ({runs}): every unit is read to the shortest, "
            f"{pool.horizon:.0f}; an onset after it is censored there."
        )
    return lines
