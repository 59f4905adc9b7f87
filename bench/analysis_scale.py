"""Analysis at scale: 100k steps x 300 metrics x 16 members (about 1.9 GB of float32).

Writes a synthetic timeline in the platform's layout (logistic progress curves with planted
onsets; 300 weight metrics in 6 primitives), then times, in the same run:
  read      reading the values array from the file with h5py, nothing else
  analysis  load_timeline, one log-spaced binning of the whole group (200 points), t50 onsets
            of every metric and member, per-primitive onsets and their ordering
and prints both times and their ratio (target: analysis <= 3 x read). The file is written to a
temporary folder (about 2 GB free needed) and removed afterwards.

    python bench/analysis_scale.py [--steps 100000] [--metrics 300] [--members 16]
"""

from __future__ import annotations

import devinterp.threads  # noqa: F401  (OpenMP's wait policy, set before torch loads)

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import report  # noqa: E402

from analysis.onset import log_grid, threshold_onsets  # noqa: E402
from analysis.ordering import infer_ordering  # noqa: E402
from callbacks.timeline_writer import STRING  # noqa: E402
from devinterp.store.timeline import load_timeline  # noqa: E402

N_PRIMITIVES = 6


def write_synthetic(path: Path, n_steps: int, n_metrics: int, n_members: int) -> None:
    rng = np.random.default_rng(0)
    primitive_of = np.arange(n_metrics) % N_PRIMITIVES
    midpoints = 4.0 + 1.0 * primitive_of[:, None] + rng.normal(0, 0.2, (n_metrics, n_members))  # log-step
    with h5py.File(path, "w") as f:
        f["meta/schema_version"] = "1"
        f["ground_truth/label_names"] = np.array(
            ["start"] + [f"p{i}" for i in range(N_PRIMITIVES)], dtype=object
        ).astype(STRING)
        g = f.create_group("every_step")
        chunk = 1024
        values = g.create_dataset(
            "values",
            shape=(n_steps, n_metrics, n_members),
            dtype=np.float32,
            chunks=(chunk // 16, n_metrics, n_members),
        )
        for start in range(0, n_steps, 8192):
            x = np.log(np.arange(start, min(start + 8192, n_steps)) + 1.0)[:, None, None]
            values[start : start + len(x)] = 1 - 1 / (1 + np.exp(-(x - midpoints[None]) / 0.3))  # KL: 1 -> 0
        g["step"] = np.arange(n_steps, dtype=np.int64)
        g["committed"] = np.array([n_steps], dtype=np.int64)
        g["names"] = np.array([f"p{p}/r{i}/kl" for i, p in enumerate(primitive_of)], dtype=object).astype(
            STRING
        )
        info = g.create_group("metric_info")
        for field, value in (("kind", "weight"), ("rule", "r")):
            info[field] = np.array([value] * n_metrics, dtype=object).astype(STRING)
        info["primitive"] = np.array([f"p{p}" for p in primitive_of], dtype=object).astype(STRING)
        info["nothing"] = np.ones(n_metrics)
        info["learned"] = np.zeros(n_metrics)


def read_seconds(path: Path) -> float:
    start = time.perf_counter()
    with h5py.File(path, "r") as f:
        f["every_step/values"][:]
    return time.perf_counter() - start


def analysis_seconds(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    timeline = load_timeline(path)
    group = timeline.groups["every_step"]
    grid_steps, grid = log_grid(group.steps, group.values, 200)  # (G, metrics, members)
    nothing = np.array([i.nothing for i in group.infos])
    learned = np.array([i.learned for i in group.infos])
    progress = np.clip((grid - nothing[None, :, None]) / (learned - nothing)[None, :, None], 0, 1)
    onsets = [threshold_onsets(name, grid_steps, progress[:, i]) for i, name in enumerate(group.names)]
    primitives = sorted({i.primitive for i in group.infos})
    by_primitive = {}
    for p in primitives:
        columns = [i for i, info in enumerate(group.infos) if info.primitive == p]
        by_primitive[p] = threshold_onsets(p, grid_steps, np.median(progress[:, columns], axis=1))
    ordering = infer_ordering(by_primitive)
    elapsed = time.perf_counter() - start
    assert len(onsets) == len(group.names) and len(ordering.dag) == len(primitives) - 1, ordering.dag
    return elapsed, len(onsets) * timeline.n_members


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--metrics", type=int, default=300)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "timeline.h5"
        write_synthetic(path, args.steps, args.metrics, args.members)
        size = path.stat().st_size / 2**30
        reads, analyses = [], []
        for _ in range(args.repeats):  # interleaved; the file is in the page cache for both
            reads.append(read_seconds(path))
            seconds, n_onsets = analysis_seconds(path)
            analyses.append(seconds)
    read, analysis = min(reads), min(analyses)
    print(
        f"{args.steps} steps x {args.metrics} metrics x {args.members} members = {size:.2f} GiB; "
        f"{n_onsets} onsets and a {N_PRIMITIVES}-primitive ordering"
    )
    print(f"{'read values (s)':<28}{read:>8.2f}")
    print(f"{'analysis (s)':<28}{analysis:>8.2f}")
    print(f"{'ratio (target <= 3)':<28}{analysis / read:>8.2f}")
    report("analysis / read time (100k x 300 x 16)", analysis / read, "<= 3")


if __name__ == "__main__":
    main()
