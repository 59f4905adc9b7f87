"""Helpers shared by the bench scripts: read a run config, time a callable."""

from __future__ import annotations

import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_run_config(name: str) -> dict:
    """configs/<name>.yaml as a plain mapping."""
    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())


def seconds_per_call(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def report(figure: str, value: float, target: str = "", unit: str = "") -> None:
    """One figure for the table ``make bench`` prints (bench/run_all.py collects these lines)."""
    print(f"BENCH\t{figure}\t{value:.4g}{unit}\t{target}", flush=True)
