"""The timeline's schema: what a metric is, how a file marks and describes its parts.

Torch-free, so the writer (callbacks/timeline_writer.py) and the reader (analysis/timeline.py)
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

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: the three groups every_step, diagnostics, probe, no marker
VERSION_1_GROUPS = ("every_step", "diagnostics", "probe")
GROUP_MARKER = "devinterp_metric_group"  # attribute set (to 1) on every metric group
VALUES_AXES = "row, metric, member"

MetricKind = Literal["weight", "diagnostic", "probe", "probe_attention", "train", "intervention"]
Yardstick = Literal["fallback", "uniform"]
YARDSTICKS: tuple[str, ...] = get_args(Yardstick)
METRIC_KINDS: tuple[str, ...] = get_args(MetricKind)

NAN = float("nan")


@dataclass(frozen=True)
class MetricInfo:
    """A metric's name and attributes, shared by the HDF5 timeline and W&B.

    kind: ``weight`` (headline KL read from the weights), ``diagnostic`` (a mechanism measure
    read from the weights), ``probe`` (measured on the probe set), ``probe_attention`` (a
    head's attention on the probe set), ``train`` (training loss of the step's batch),
    ``intervention`` (a penalty's or clamp's value, window and gradient: callbacks/interventions.py).
    ``nothing`` / ``learned``: the values meaning "nothing learned" (the uniform prediction) and
    "learned" (progress metrics only, NaN otherwise). ``fallback``: "nothing learned" measured
    against the best prediction without the primitive (devinterp/baselines.py), the default
    yardstick of onsets; ``fallback_from`` says what it is: ``knock_out`` (the best mixture of the
    knocked-out language and uniform) or ``uniform`` (no knock-out exists: the category fallback,
    a corpus, a metric of all primitives), where it equals ``nothing``. ``sparse``: NaN means "no
    data at this step". ``unit``: of the values, where they have one.
    """

    name: str
    kind: MetricKind
    primitive: str
    rule: str
    nothing: float = NAN
    learned: float = NAN
    sparse: bool = False
    unit: str = ""
    fallback: float = NAN
    fallback_from: str = ""

    def __post_init__(self):
        if self.kind not in METRIC_KINDS:
            raise ValueError(
                f"{self.name}: metric kind {self.kind!r} is not one of {', '.join(METRIC_KINDS)}"
            )

    @property
    def is_progress(self) -> bool:
        return not (math.isnan(self.nothing) or math.isnan(self.learned) or self.nothing == self.learned)

    def baseline(self, yardstick: Yardstick = "fallback") -> float:
        """The value meaning "nothing learned" on a yardstick: ``fallback`` (the best prediction
        without the primitive; the uniform one where the metric has none) or ``uniform``."""
        if yardstick not in YARDSTICKS:
            raise ValueError(f"yardstick: expected one of {', '.join(YARDSTICKS)}, got {yardstick!r}")
        if yardstick == "fallback" and not math.isnan(self.fallback):
            return self.fallback
        return self.nothing


# metric_info/<field>: how each MetricInfo field is stored (the name is the group's `names`)
INFO_FIELDS: dict[str, str] = {
    "kind": "str",
    "primitive": "str",
    "rule": "str",
    "nothing": "float",
    "learned": "float",
    "sparse": "bool",
    "unit": "str",
    "fallback": "float",
    "fallback_from": "str",
}
INFO_DEFAULTS = {f.name: f.default for f in fields(MetricInfo) if f.name in INFO_FIELDS}
assert set(INFO_FIELDS) == {f.name for f in fields(MetricInfo)} - {"name"}, "every field is stored"


def progress(
    values: np.ndarray | float, nothing: np.ndarray | float, learned: np.ndarray | float
) -> np.ndarray:
    """(values - nothing) / (learned - nothing): 0 = nothing learned, 1 = learned (not clipped)."""
    return (np.asarray(values, dtype=np.float64) - nothing) / (np.asarray(learned) - nothing)
