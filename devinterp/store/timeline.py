"""Reading a run's HDF5 timeline (layout in devinterp/store/schema.py), without torch.

``load_timeline(path)`` reads a finished file, a file still being written in live (SWMR) mode,
and a file whose writer was killed; only committed rows are returned, so nothing half-written
is read back as data. Every metric group is read: those marked by the writer (``GROUP_MARKER``;
schema 2), or the three groups of schema 1, so a group a new producer adds needs no change
here. A file that is not a timeline, or has an unknown schema version, raises TimelineError
naming the file.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from devinterp.store.schema import (
    BLIND_SINCE,
    GROUP_MARKER,
    INFO_DEFAULTS,
    INFO_FIELDS,
    LEGACY_INFO_FIELDS,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    MetricInfo,
    Yardstick,
)
from devinterp.store.schema import progress as progress_of

KNOWN_SCHEMA_VERSIONS = set(READABLE_VERSIONS)


class TimelineError(ValueError):
    """A file is not a readable timeline; the message names it and what is wrong."""


@dataclass(frozen=True)
class Group:
    """One cadence group: steps (N,), values (N, n_metrics, n_members), metric attributes."""

    steps: np.ndarray
    values: np.ndarray
    infos: tuple[MetricInfo, ...]

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.infos]


@dataclass(frozen=True)
class Timeline:
    """A run's metrics. ``values(name)`` is (steps, members); ``progress(name)`` maps a
    progress metric to [0, 1] (0 = nothing learned, 1 = learned)."""

    path: Path
    groups: dict[str, Group]
    meta: dict[str, str]
    label_names: tuple[str, ...]
    primitive_kinds: dict[str, str] = field(default_factory=dict)  # primitive name -> kind (schema 2)
    vocab: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    token_category: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (vocab,)
    snapshot_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # -1 = not taken

    @property
    def n_members(self) -> int:
        return next(iter(self.groups.values())).values.shape[2]

    @property
    def run_name(self) -> str:
        """The run's folder name (the file's name for a timeline outside a run folder)."""
        return self.path.parent.name or self.path.name

    def to_xarray(self, group: str, names: str = "*"):
        """The group's metrics matching ``names`` as an xarray DataArray (step, metric, member),
        read from this timeline's file (``to_xarray`` below)."""
        return to_xarray(self.path, group, names)

    def to_dataframe(self, group: str, names: str = "*"):
        """The long form (step, metric, member, value, metric infos) as a pandas DataFrame."""
        return to_dataframe(self.path, group, names)

    @property
    def empty_primitives(self) -> dict[str, str]:
        """Primitives that can never fire in this run's language (devinterp/language/
        reachability.py), each with the tokens it lacks; empty for timelines written before."""
        return json.loads(self.meta.get("empty_primitives", "{}"))

    @property
    def last_step(self) -> int:
        """The last step any metric group recorded."""
        return int(max(g.steps.max() for g in self.groups.values() if len(g.steps)))

    def group_of(self, name: str) -> str:
        """The cadence group holding metric ``name`` (KeyError naming the file if none does)."""
        for group_name, group in self.groups.items():
            if name in group.names:
                return group_name
        raise KeyError(f"{self.path}: no metric named {name!r}")

    def names(self, pattern: str = "*", group: str | None = None) -> list[str]:
        """Metric names matching a glob pattern (e.g. ``bigram/*/kl``), in file order."""
        groups = [self.groups[group]] if group else self.groups.values()
        return [n for g in groups for n in g.names if fnmatch.fnmatchcase(n, pattern)]

    def steps(self, name_or_group: str) -> np.ndarray:
        """(N,) the steps of a group's rows, or of the group holding a metric."""
        group = name_or_group if name_or_group in self.groups else self.group_of(name_or_group)
        return self.groups[group].steps

    def info(self, name: str) -> MetricInfo:
        """A metric's attributes: kind, primitive, rule, its yardsticks (devinterp/store/schema.py)."""
        group = self.groups[self.group_of(name)]
        return group.infos[group.names.index(name)]

    def values(self, name: str) -> np.ndarray:
        """(steps, members) values of one metric."""
        group = self.groups[self.group_of(name)]
        return group.values[:, group.names.index(name)]

    def progress(
        self, name: str, yardstick: Yardstick = "blind", baseline: float | None = None
    ) -> np.ndarray:
        """(steps, members): (value - baseline) / (learned - baseline), not clipped: 1 = learned,
        0 = as good as the yardstick's baseline, below 0 = not yet that good. ``yardstick``
        (devinterp/baselines.py): ``blind`` (default; NaN where the metric is unmeasurable),
        ``knock_out`` or ``uniform``; the uniform baseline where the metric has no other.
        ``baseline`` overrides the file's (dependence compares variants on the full run's)."""
        info = self.info(name)
        if not info.is_progress:
            raise KeyError(f"{self.path}: {name} is not a progress metric")
        self.check_yardstick(yardstick)
        if baseline is None and not info.measurable(yardstick):
            return np.full(self.values(name).shape, np.nan)
        nothing = info.baseline(yardstick) if baseline is None else baseline
        return progress_of(self.values(name), nothing, info.learned)

    def check_yardstick(self, yardstick: Yardstick) -> None:
        """A file written before the blind yardstick is never read on it (silently on another)."""
        version = self.meta.get("schema_version", str(SCHEMA_VERSION))
        if yardstick == "blind" and version.isdigit() and int(version) < BLIND_SINCE:
            raise TimelineError(
                f"{self.path}: written with schema {version}, before the blind yardstick: it has no "
                "blind baselines; analyse it with --yardstick knock_out (its old fallback) or uniform, "
                "or train it again"
            )

    def baselines(self, yardstick: Yardstick = "blind") -> dict[str, float]:
        """Every progress metric's "nothing learned" value on a yardstick, by name."""
        self.check_yardstick(yardstick)
        return {i.name: i.baseline(yardstick) for g in self.groups.values() for i in g.infos if i.is_progress}

    def snapshot(self, slot: int) -> tuple[int, dict[str, np.ndarray]]:
        """(step, {parameter: (member, ...) float32}) of weight snapshot ``slot``, read from the
        file now (snapshots are large, so ``load_timeline`` does not keep them)."""
        with open_timeline(self.path) as f:
            s = f["snapshots"]
            if f.swmr_mode:
                s["step"].refresh()
            return int(s["step"][slot]), {
                name: s[name][slot] for name in s if name not in ("step", "planned_step")
            }


def open_timeline(path: str | Path) -> h5py.File:
    """Plain read, or SWMR read when a writer holds the file or was killed holding it (the file
    is never altered: no ``h5clear``)."""
    try:
        return h5py.File(path, "r")
    except OSError as error:
        if "truncated file" in str(error):  # closed cleanly, then cut short: SWMR reads of it would
            raise TimelineError(  # retry every damaged chunk for minutes before failing
                f"{path}: truncated ({str(error).split('(', 1)[-1].rstrip(')')})"
            ) from None
    try:
        return h5py.File(path, "r", swmr=True, libver="latest")
    except OSError as error:
        if "unable to lock file" in str(error):
            raise TimelineError(
                f"{path}: a run is writing it without SWMR (a file from before every timeline was "
                "written in SWMR mode); read it when the run ends"
            ) from None
        if "not already open for SWMR writing" in str(error):  # a version that named the file early
            raise TimelineError(
                f"{path}: its run was killed while creating it, before any row was written; "
                f"start the run again (h5clear -s {path} makes the empty file readable)"
            ) from None
        raise TimelineError(f"{path}: not a readable HDF5 file ({error})") from None


def _strings(dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]


def _read_group(f: h5py.File, name: str, path: Path, pattern: str = "*") -> Group:
    """One group's committed rows; with ``pattern`` (a glob on metric names) only the matching
    metrics' columns are read from the file."""
    g = f[name]
    for key in ("step", "values", "names", "committed", "metric_info"):
        if key not in g:
            raise TimelineError(f"{path}: group {name!r} has no {key!r}")
    if f.swmr_mode:  # see what a live writer has flushed so far
        for key in ("committed", "step", "values"):
            g[key].refresh()
    if g["values"].ndim != 3 or g["step"].ndim != 1 or g["committed"].shape != (1,):
        raise TimelineError(f"{path}: group {name!r} has datasets of the wrong shape")
    n = min(int(g["committed"][0]), g["step"].shape[0], g["values"].shape[0])
    names = _strings(g["names"])
    info = g["metric_info"]
    columns = {}
    stored = {LEGACY_INFO_FIELDS.get(key, key): key for key in info}  # field -> its dataset here
    for key, kind in INFO_FIELDS.items():
        if key not in stored:  # a field newer than the file: its default
            if key in ("kind", "primitive", "rule", "nothing", "learned"):
                raise TimelineError(f"{path}: group {name!r}: metric_info/{key} is missing")
            columns[key] = [INFO_DEFAULTS[key]] * len(names)
            continue
        dataset = info[stored[key]]
        if dataset.shape != (len(names),):
            raise TimelineError(f"{path}: group {name!r}: metric_info/{stored[key]} is not one per metric")
        cast = {"str": str, "float": float, "bool": bool}[kind]
        columns[key] = [cast(v) for v in (_strings(dataset) if kind == "str" else dataset[()])]
    try:
        infos = tuple(MetricInfo(n_, **{k: columns[k][i] for k in INFO_FIELDS}) for i, n_ in enumerate(names))
    except ValueError as error:
        raise TimelineError(f"{path}: group {name!r}: {error}") from None
    if g["values"].shape[1] != len(names):
        raise TimelineError(
            f"{path}: group {name!r} has {g['values'].shape[1]} value columns for {len(names)} names"
        )
    if pattern == "*":
        values = g["values"][:n]
    else:
        chosen = [i for i, metric in enumerate(names) if fnmatch.fnmatchcase(metric, pattern)]
        infos = tuple(infos[i] for i in chosen)
        values = g["values"][:n, chosen] if chosen else np.zeros((n, 0, g["values"].shape[2]))
    steps = g["step"][:n]
    if n > 1 and not np.all(np.diff(steps) > 0):
        raise TimelineError(f"{path}: group {name!r}: steps are not increasing")
    return Group(steps=steps, values=values, infos=infos)


def read_group(path: str | Path, group: str, pattern: str = "*") -> Group:
    """The committed rows of one group's metrics matching ``pattern``, read from the file (only
    those columns): what ``to_xarray`` labels."""
    path = Path(path)
    if not path.is_file():
        raise TimelineError(f"{path}: no such timeline file")
    with open_timeline(path) as f:
        if group not in f or not f[group].attrs.get(GROUP_MARKER):
            known = sorted(n for n, g in f.items() if isinstance(g, h5py.Group) and g.attrs.get(GROUP_MARKER))
            raise TimelineError(f"{path}: no metric group {group!r} (groups: {', '.join(known)})")
        return _read_group(f, group, path, pattern)


def load_timeline(path: str | Path) -> Timeline:
    """Read every committed row of every cadence group of a timeline file."""
    path = Path(path)
    if not path.is_file():
        raise TimelineError(f"{path}: no such timeline file")
    try:
        return _load(path)
    except (OSError, KeyError, ValueError) as error:
        if isinstance(error, TimelineError):
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TimelineError(f"{path}: damaged timeline ({message})") from None


def _load(path: Path) -> Timeline:
    with open_timeline(path) as f:
        if "meta" not in f or "schema_version" not in f["meta"]:
            raise TimelineError(f"{path}: not a timeline (no meta/schema_version)")
        version = f["meta/schema_version"][()]
        version = version.decode() if isinstance(version, bytes) else str(version)
        if not version.isdigit() or int(version) not in KNOWN_SCHEMA_VERSIONS:
            raise TimelineError(
                f"{path}: unknown timeline schema version {version!r} "
                f"(this version reads {sorted(KNOWN_SCHEMA_VERSIONS)})"
            )
        meta = {
            k: (v[()].decode() if isinstance(v[()], bytes) else str(v[()]))
            for k, v in f["meta"].items()
            if v.shape == ()
        }  # the string fields
        names = [name for name, g in f.items() if isinstance(g, h5py.Group) and g.attrs.get(GROUP_MARKER)]
        groups = {name: _read_group(f, name, path) for name in names}
        if not groups:
            raise TimelineError(f"{path}: no metric groups")
        truth = f["ground_truth"] if "ground_truth" in f else {}
        labels = tuple(_strings(truth["label_names"])) if "label_names" in truth else ()
        kinds = {
            name: _string(g["kind"][()])
            for name, g in truth.items()
            if isinstance(g, h5py.Group) and "kind" in g
        }
        snapshot_steps = f["snapshots/step"][()] if "snapshots/step" in f else np.zeros(0, dtype=np.int64)
        vocab = tuple(_strings(truth["vocab"])) if "vocab" in truth else ()
        categories = tuple(_strings(truth["categories"])) if "categories" in truth else ()
        token_category = (
            truth["token_category"][()] if "token_category" in truth else np.zeros(0, dtype=np.int64)
        )
    return Timeline(
        path=path,
        groups=groups,
        meta=meta,
        label_names=labels,
        primitive_kinds=kinds,
        snapshot_steps=snapshot_steps,
        vocab=vocab,
        categories=categories,
        token_category=token_category,
    )


def _string(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# A group as labelled data for plotting: an xarray DataArray or a long pandas frame. Both read
# only the committed rows of the metrics asked for (a glob on their names), so a figure of four
# curves does not load a run's every metric; the metric infos (devinterp/store/schema.py) travel
# along, as coordinates on the ``metric`` dimension or as columns of the frame:
#     curves = to_xarray("runs/quickstart/timeline.h5", "probe", "probe_excess/*")
#     curves.median("member").plot.line(x="step", xscale="log")  # one line per primitive


def to_xarray(path: str | Path, group: str, names: str = "*"):
    """The group's metrics matching ``names`` as a DataArray with dims (step, metric, member):
    coordinates ``step`` (the rows' steps), ``metric`` (names) with every metric info field along
    it, and ``member``; values as stored (NaN where a sparse metric has no value)."""
    import xarray as xr

    found = read_group(path, group, names)
    metric_coords = {key: ("metric", [getattr(i, key) for i in found.infos]) for key in INFO_FIELDS}
    return xr.DataArray(
        found.values,
        dims=("step", "metric", "member"),
        coords={
            "step": found.steps,
            "metric": [i.name for i in found.infos],
            "member": list(range(found.values.shape[2])),
            **metric_coords,
        },
        name=group,
        attrs={"timeline": str(path), "group": group},
    )


def to_dataframe(path: str | Path, group: str, names: str = "*"):
    """The long form for pandas and seaborn: one row per (step, metric, member) with columns
    step, metric, member, value and every metric info field."""
    frame = to_xarray(path, group, names).to_dataframe(name="value").reset_index()
    return frame[["step", "metric", "member", "value", *INFO_FIELDS]]
