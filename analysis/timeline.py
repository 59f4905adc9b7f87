"""Reading a run's HDF5 timeline (layout in callbacks/timeline_writer.py).

``load_timeline(path)`` reads a finished file, a file still being written in live (SWMR) mode,
and a file whose writer was killed; only committed rows are returned, so nothing half-written
is read back as data. A file that is not a timeline, or has an unknown schema version, raises
TimelineError naming the file.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from devinterp.metrics import MetricInfo

KNOWN_SCHEMA_VERSIONS = {1}


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

    @property
    def n_members(self) -> int:
        return next(iter(self.groups.values())).values.shape[2]

    def group_of(self, name: str) -> str:
        for group_name, group in self.groups.items():
            if name in group.names:
                return group_name
        raise KeyError(f"{self.path}: no metric named {name!r}")

    def names(self, pattern: str = "*", group: str | None = None) -> list[str]:
        """Metric names matching a glob pattern (e.g. ``bigram/*/kl``), in file order."""
        groups = [self.groups[group]] if group else self.groups.values()
        return [n for g in groups for n in g.names if fnmatch.fnmatchcase(n, pattern)]

    def steps(self, name_or_group: str) -> np.ndarray:
        group = name_or_group if name_or_group in self.groups else self.group_of(name_or_group)
        return self.groups[group].steps

    def info(self, name: str) -> MetricInfo:
        group = self.groups[self.group_of(name)]
        return group.infos[group.names.index(name)]

    def values(self, name: str) -> np.ndarray:
        """(steps, members) values of one metric."""
        group = self.groups[self.group_of(name)]
        return group.values[:, group.names.index(name)]

    def progress(self, name: str) -> np.ndarray:
        """(steps, members) in [0, 1]: (value - nothing) / (learned - nothing), clipped."""
        info = self.info(name)
        if math.isnan(info.nothing) or info.nothing == info.learned:
            raise KeyError(f"{self.path}: {name} is not a progress metric")
        return np.clip((self.values(name) - info.nothing) / (info.learned - info.nothing), 0.0, 1.0)


def _open(path: Path) -> h5py.File:
    """Plain read, or SWMR read when a live writer holds the file."""
    try:
        return h5py.File(path, "r")
    except OSError:
        pass
    try:
        return h5py.File(path, "r", swmr=True, libver="latest")
    except OSError as error:
        if "unable to lock file" in str(error):
            raise TimelineError(f"{path}: a run is writing it without live mode; read it when the run ends, "
                                "or train with --timeline.live true to read while it runs") from None
        raise TimelineError(f"{path}: not a readable HDF5 file ({error})") from None


def _strings(dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]


def _read_group(f: h5py.File, name: str, path: Path) -> Group:
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
    for key in ("kind", "primitive", "rule", "nothing", "learned"):
        if key not in info or info[key].shape != (len(names),):
            raise TimelineError(f"{path}: group {name!r}: metric_info/{key} is missing or not one per metric")
    fields = [_strings(info[k]) for k in ("kind", "primitive", "rule")]
    sparse = info["sparse"][()] if "sparse" in info else np.zeros(len(names), dtype=bool)
    infos = tuple(MetricInfo(n_, k, p, r, float(a), float(b), bool(s)) for n_, k, p, r, a, b, s in
                  zip(names, *fields, info["nothing"][()], info["learned"][()], sparse))
    values = g["values"][:n]
    if values.shape[1] != len(names):
        raise TimelineError(f"{path}: group {name!r} has {values.shape[1]} value columns for {len(names)} names")
    steps = g["step"][:n]
    if n > 1 and not np.all(np.diff(steps) > 0):
        raise TimelineError(f"{path}: group {name!r}: steps are not increasing")
    return Group(steps=steps, values=values, infos=infos)


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
    with _open(path) as f:
        if "meta" not in f or "schema_version" not in f["meta"]:
            raise TimelineError(f"{path}: not a timeline (no meta/schema_version)")
        version = f["meta/schema_version"][()]
        version = version.decode() if isinstance(version, bytes) else str(version)
        if not version.isdigit() or int(version) not in KNOWN_SCHEMA_VERSIONS:
            raise TimelineError(f"{path}: unknown timeline schema version {version!r} "
                                f"(this version reads {sorted(KNOWN_SCHEMA_VERSIONS)})")
        meta = {k: (v[()].decode() if isinstance(v[()], bytes) else str(v[()]))
                for k, v in f["meta"].items() if v.shape == ()}  # the string fields
        groups = {name: _read_group(f, name, path) for name in ("every_step", "diagnostics", "probe") if name in f}
        if not groups:
            raise TimelineError(f"{path}: no metric groups")
        labels = tuple(_strings(f["ground_truth/label_names"])) if "ground_truth/label_names" in f else ()
    return Timeline(path=path, groups=groups, meta=meta, label_names=labels)
