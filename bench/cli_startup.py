"""Start-up time of the ``devinterp`` commands, against a baseline measured in the same run.

Targets (issue "Reliability: the record is whole"): ``devinterp --help``, ``language show`` and
``analyze --help`` start in about a second; ``fit --help`` is no slower than Lightning itself.
Baselines: ``python -c pass`` (the interpreter alone) for the light commands, and a bare
LightningCLI's ``fit --help`` (a one-layer model, no devinterp import) for ``fit --help``.
Each figure is the median wall time of fresh processes.
"""

from __future__ import annotations

import subprocess
import sys
import time

from common import ROOT, report

BARE_LIGHTNING = """
import lightning as L, torch
from lightning.pytorch.cli import LightningCLI
class Model(L.LightningModule):
    def __init__(self, width: int = 4):
        super().__init__()
        self.layer = torch.nn.Linear(width, width)
LightningCLI(Model, args=["fit", "--help"])
"""


def wall(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    python = [sys.executable]
    devinterp = [sys.executable, "-m", "devinterp"]
    interpreter = wall([*python, "-c", "pass"], 5)
    print(f"interpreter alone: {interpreter:.2f} s")
    for name, args in (
        ("--help", ["--help"]),
        ("language show", ["language", "show", "configs/languages/seed.yaml"]),
        ("analyze --help", ["analyze", "--help"]),
    ):
        seconds = wall([*devinterp, *args], 5)
        print(f"devinterp {name}: {seconds:.2f} s ({seconds / interpreter:.1f}x the interpreter)")
        report(f"startup: devinterp {name} (s)", seconds, "about 1 s")
    lightning = wall([*python, "-c", BARE_LIGHTNING], 3)
    fit_help = wall([*devinterp, "fit", "--help"], 3)
    print(f"bare LightningCLI fit --help: {lightning:.2f} s; devinterp fit --help: {fit_help:.2f} s")
    report("startup: fit --help / bare LightningCLI", fit_help / lightning, "<= 1 (no slower)")


if __name__ == "__main__":
    main()
