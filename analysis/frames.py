"""A timeline group as labelled data for plotting: an xarray DataArray or a long pandas frame.

Both read from the file only the committed rows of the metrics asked for (a glob on their names),
so a figure of four curves does not load a run's every metric. The metric infos
(devinterp/schema.py: kind, primitive, rule, the progress yardsticks, ...) travel along: as
coordinates on the ``metric`` dimension of the DataArray, as columns of the frame.

    import analysis.frames as frames
    curves = frames.to_xarray("runs/quickstart/timeline.h5", "probe", "probe_excess/*")
    curves.median("member").plot.line(x="step", xscale="log")  # one line per primitive
"""

from __future__ import annotations

from pathlib import Path

from analysis.timeline import read_group
from devinterp.schema import INFO_FIELDS


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
