"""Reading timelines, detecting onsets, inferring the order primitives are learned in."""

import devinterp.threads  # noqa: F401  (sets OpenMP's wait policy before torch loads)

from analysis.frames import to_dataframe, to_xarray
from analysis.timeline import Timeline, TimelineError, load_timeline

__all__ = ["Timeline", "TimelineError", "load_timeline", "to_dataframe", "to_xarray"]
