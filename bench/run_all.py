"""``make bench``: every benchmark in bench/, one after another, then one table of their figures.

Each script prints its own details and ``BENCH`` lines (common.report) that this collects.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    ["dgp_throughput.py"],
    ["dgp_throughput.py", "--language", "configs/languages/rich.yaml"],
    ["data_throughput.py"],
    ["tracking_overhead.py"],
    ["intervention_overhead.py"],
    ["ensemble_scaling.py"],
    ["reference_loop.py"],
    ["attention_paths.py"],
    ["analysis_scale.py"],
    ["gpu_sync_check.py"],
    ["cli_startup.py"],
    ["llc_speed.py"],
    ["llc_invariance.py"],
    ["llc_floor.py"],
    ["contention.py"],  # last: it starts competing processes of its own
]


def main() -> int:
    rows, failed = [], []
    for script, *args in SCRIPTS:
        print(f"\n== bench/{script} {' '.join(args)}", flush=True)
        process = subprocess.Popen(
            [sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, text=True, cwd=HERE.parent
        )
        for line in process.stdout:
            if line.startswith("BENCH\t"):
                rows.append(line.rstrip("\n").split("\t")[1:])
            else:
                print(line, end="", flush=True)
        if process.wait() != 0:
            failed.append(" ".join([script, *args]))
    width = max([len(r[0]) for r in rows] + [6])
    print(f"\n{'figure':<{width}}  {'value':>10}  target")
    for figure, value, target in rows:
        print(f"{figure:<{width}}  {value:>10}  {target}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
