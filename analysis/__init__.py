"""Reading timelines, detecting onsets, inferring the order primitives are learned in."""

from analysis.timeline import Timeline, TimelineError, load_timeline

__all__ = ["Timeline", "TimelineError", "load_timeline"]
