"""The timeline's schema: what a metric is, how a file marks and describes its parts.

Torch-free, so the writer (callbacks/timeline_writer.py) and the reader (devinterp/store/timeline.py)
share it and analysis works from a file alone. Layout of a timeline file (version 2):

    meta/            schema_version, package_version, config (every section of the resolved run
                     config, YAML), language_spec (the spec as written; a corpus: its path,
                     sha256, shape and labels), logged_through (1,) int64: the last step handed
                     to the loggers (W&B), stream_kind: the training stream (numpy, or
                     torch-<device type> for the device sampler; absent in older files: numpy),
                     compute (YAML: torch and BLAS threads, OpenMP's wait policy and the cores
                     available, of the process that wrote the file's latest segment)
    ground_truth/    vocab, categories, token_category, label_names, rule_names, and per
                     primitive <name>/kind plus its defining arrays (tables, rule indices)
    <group>/         one per producer and cadence (every_step/, diagnostics/, probe/, ...),
                     marked by the attribute ``GROUP_MARKER``:
        step         (N,) int64: row r holds the metrics at step[r], increasing
        values       (N, n_metrics, n_members) float32, chunked along N, resizable
        names        (n_metrics,) metric names, shared with W&B
        metric_info/ one dataset per field of ``MetricInfo`` but the name, one entry per metric
        committed    (1,) int64: rows written and flushed; rows past it may be half-written
    snapshots/       step (n,) int64 (-1 = not yet), planned_step (n,), <parameter> (n, *shape)
                     float32: the weights at log-spaced steps, preallocated

Row 0 of a group is its first step (step 0 = the initial weights). Every dataset carries an
``axes`` attribute naming its axes and, where the values have one, a ``unit``, so h5ls/h5dump
users can read the file without this package.

Adding a metric_info field is one line in ``MetricInfo`` (with a default) and one in
``INFO_FIELDS``; files written before it read back with the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, get_args

import numpy as np

SCHEMA_VERSION = 3  # 3: the blind yardstick (metric_info/blind, blind_from, mass); knock_out was fallback
READABLE_VERSIONS = (2, 3)  # 2: metric_info/fallback, read as knock_out
BLIND_SINCE = 3  # files before it have no blind baselines: the blind yardstick refuses them
LEGACY_INFO_FIELDS = {"fallback": "knock_out"}  # metric_info datasets renamed since: old name -> new
GROUP_MARKER = "devinterp_metric_group"  # attribute set (to 1) on every metric group
VALUES_AXES = "row, metric, member"

MetricKind = Literal["weight", "diagnostic", "probe", "probe_attention", "train", "intervention", "strategy"]
Yardstick = Literal["blind", "knock_out", "uniform"]
UNMEASURABLE = 0.2  # blind baseline within this share of the uniform one: the metric is unmeasurable
YARDSTICKS: tuple[str, ...] = get_args(Yardstick)
METRIC_KINDS: tuple[str, ...] = get_args(MetricKind)

NAN = float("nan")


@dataclass(frozen=True)
class MetricInfo:
    """A metric's name and attributes, shared by the HDF5 timeline and W&B.

    kind: ``weight`` (headline KL read from the weights), ``diagnostic`` (a mechanism measure
    read from the weights), ``probe`` (measured on the probe set), ``probe_attention`` (a
    head's attention on the probe set), ``train`` (training loss of the step's batch),
    ``intervention`` (a penalty's or clamp's value, window and gradient:
    callbacks/mechanism_interventions.py), ``strategy`` (KL(strategy || model) on a primitive's
    probe positions: devinterp/strategies.py).
    ``nothing`` / ``learned``: the values meaning "nothing learned" (the uniform prediction) and
    "learned" (progress metrics only, NaN otherwise). The primitive-specific yardsticks
    (devinterp/baselines.py): ``blind``, "nothing learned" for a model that cannot read what the
    primitive needs (the best pool of its knock-out, the oracles its type admits and uniform; the
    default), with ``blind_from`` the pool's components; ``knock_out``, the best mix of the
    knocked-out language and uniform. NaN where the metric has none (the fallback primitive has
    no knock-out; a corpus and a metric of all primitives have neither): the uniform ``nothing``
    stands in. ``mass``: what the metric averages over (probe: positions; weights: the rule's
    positions in a training-distribution sample), so a primitive's progress is a ratio of sums
    over its rules. ``sparse``: NaN means "no data at this step". ``unit``: of the values.
    """

    name: str
    kind: MetricKind
    primitive: str
    rule: str
    nothing: float = NAN
    learned: float = NAN
    sparse: bool = False
    unit: str = ""
    knock_out: float = NAN
    blind: float = NAN
    blind_from: str = ""
    mass: float = NAN

    def __post_init__(self):
        if self.kind not in METRIC_KINDS:
            raise ValueError(
                f"{self.name}: metric kind {self.kind!r} is not one of {', '.join(METRIC_KINDS)}"
            )

    @property
    def is_progress(self) -> bool:
        return not (math.isnan(self.nothing) or math.isnan(self.learned) or self.nothing == self.learned)

    def baseline(self, yardstick: Yardstick = "blind") -> float:
        """The value meaning "nothing learned" on a yardstick: ``blind``, ``knock_out`` (the
        uniform one where the metric has none) or ``uniform``."""
        if yardstick not in YARDSTICKS:
            raise ValueError(f"yardstick: expected one of {', '.join(YARDSTICKS)}, got {yardstick!r}")
        value = {"blind": self.blind, "knock_out": self.knock_out, "uniform": self.nothing}[yardstick]
        return self.nothing if math.isnan(value) else value

    def measurable(self, yardstick: Yardstick = "blind") -> bool:
        """False on the blind yardstick where the blind baseline is within ``UNMEASURABLE`` of the
        uniform one's distance to "learned": what the primitive adds is (nearly) all readable by a
        model that cannot implement it, and progress would be a ratio of two small numbers."""
        if yardstick != "blind" or math.isnan(self.blind):
            return True
        return self.blind - self.learned > UNMEASURABLE * (self.nothing - self.learned)


# metric_info/<field>: how each MetricInfo field is stored (the name is the group's `names`)
INFO_FIELDS: dict[str, str] = {
    "kind": "str",
    "primitive": "str",
    "rule": "str",
    "nothing": "float",
    "learned": "float",
    "sparse": "bool",
    "unit": "str",
    "knock_out": "float",
    "blind": "float",
    "blind_from": "str",
    "mass": "float",
}
INFO_DEFAULTS = {f.name: f.default for f in fields(MetricInfo) if f.name in INFO_FIELDS}
assert set(INFO_FIELDS) == {f.name for f in fields(MetricInfo)} - {"name"}, "every field is stored"


def progress(
    values: np.ndarray | float, nothing: np.ndarray | float, learned: np.ndarray | float
) -> np.ndarray:
    """(values - nothing) / (learned - nothing): 0 = nothing learned, 1 = learned (not clipped)."""
    return (np.asarray(values, dtype=np.float64) - nothing) / (np.asarray(learned) - nothing)


def pooled_progress(
    values: np.ndarray,
    infos: list[MetricInfo],
    yardstick: Yardstick = "blind",
    baselines: list[float] | None = None,
) -> np.ndarray:
    """A primitive's progress, defined once: 1 - sum(excess) / sum(baseline), a ratio of sums,
    from its metrics ``values`` (metric, ...) with their ``infos``: each metric weighted by its
    ``mass`` (positions; 1 where a file has none), in general sum m (v - b) / sum m (learned - b).
    Metrics unmeasurable on the yardstick are left out (unless ``baselines``, one per metric,
    override theirs); with none left the progress is NaN. Returns values' shape without its
    first axis."""
    values = np.asarray(values, dtype=np.float64)
    keep = [k for k, info in enumerate(infos) if baselines is not None or info.measurable(yardstick)]
    if not keep:
        return np.full(values.shape[1:], np.nan)
    extra = (1,) * (values.ndim - 1)
    mass = np.array([1.0 if math.isnan(infos[k].mass) else infos[k].mass for k in keep]).reshape(-1, *extra)
    base = np.array(
        [infos[k].baseline(yardstick) if baselines is None else baselines[k] for k in keep]
    ).reshape(-1, *extra)
    learned = np.array([infos[k].learned for k in keep]).reshape(-1, *extra)
    return (mass * (values[keep] - base)).sum(0) / (mass * (learned - base)).sum(0)
