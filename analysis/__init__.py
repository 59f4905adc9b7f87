"""Reading timelines, detecting onsets, inferring the order primitives are learned in."""

import devinterp.threads  # noqa: F401  (sets OpenMP's wait policy before torch loads)

from devinterp.store.timeline import Timeline, TimelineError, load_timeline, to_dataframe, to_xarray

__all__ = ["Timeline", "TimelineError", "load_timeline", "to_dataframe", "to_xarray"]
