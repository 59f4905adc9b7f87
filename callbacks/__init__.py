"""Lightning callbacks: weight metrics every step, probe curves, and the HDF5 timeline."""

from callbacks.circuit_metrics import CircuitMetrics
from callbacks.probe_metrics import ProbeMetrics
from callbacks.timeline_writer import NonFiniteMetricError, TimelineWriter

__all__ = ["CircuitMetrics", "NonFiniteMetricError", "ProbeMetrics", "TimelineWriter"]
