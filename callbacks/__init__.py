"""Lightning callbacks: probe metrics (and, in time, circuit snapshots and the HDF5 timeline)."""

from callbacks.probe_metrics import ProbeMetrics

__all__ = ["ProbeMetrics"]
