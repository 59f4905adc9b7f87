"""When a periodic measurement runs: every n steps, or log-spaced (dense early, sparse later).

The log-spaced schedule depends on the step alone, not on ``max_steps``, so a resumed or
extended run keeps it: every step below ``2 * per_doubling``, then every 2nd step up to
``4 * per_doubling``, every 4th up to ``8 * per_doubling``, and so on, i.e. ``per_doubling``
measurements per doubling of the step. Onsets are read on a log-step axis (analysis/onset.py),
so this spends measurements evenly where onsets are resolved. With 16 per doubling a 1500-step
run has 120 measurements (every 10 steps: 151), at steps 2 apart around step 50 instead of 10.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Cadence = Literal["log", "every_n_steps"]


def log_interval(step: int, per_doubling: int) -> int:
    """The spacing of the log-spaced schedule around ``step``: a power of two."""
    return 1 << max(0, (step // per_doubling).bit_length() - 1)


def is_due(step: int, schedule: Cadence, every_n_steps: int, per_doubling: int) -> bool:
    if schedule == "log":
        return step % log_interval(step, per_doubling) == 0
    return step % every_n_steps == 0


def due_steps(max_steps: int, schedule: Cadence, every_n_steps: int, per_doubling: int) -> np.ndarray:
    """Every due step in 0..max_steps (the last step is measured anyway by the callers)."""
    return np.array([s for s in range(max_steps + 1) if is_due(s, schedule, every_n_steps, per_doubling)])
