"""Lightning callbacks: weight metrics every step, probe curves, and the HDF5 timeline."""

import devinterp.threads  # noqa: F401  (sets OpenMP's wait policy before torch loads)

from callbacks.circuit_metrics import CircuitMetrics
from callbacks.probe_metrics import ProbeMetrics
from callbacks.timeline_writer import NonFiniteMetricError, TimelineWriter

__all__ = ["CircuitMetrics", "NonFiniteMetricError", "ProbeMetrics", "TimelineWriter"]
