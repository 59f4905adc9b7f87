"""A `devinterp fit` child of `dependence` and `sweep`: its output shown live, its error kept.

The child's stderr is passed through as it comes (progress bars included) and its tail kept, so
when it fails the parent can print the child's own last message on a line of its own, instead of
a bare "run failed" glued to the end of a progress bar.
"""

from __future__ import annotations

import os
import subprocess
import sys

TAIL_BYTES = 8192


def last_message(tail: str) -> str:
    """The child's last line that is not a progress bar's (tqdm redraws with carriage returns; a
    message written right after a bar, with no newline between, is what follows the bar's "]")."""
    for line in reversed(tail.replace("\r", "\n").splitlines()):
        if "%|" in line and "]" in line:  # a progress bar, perhaps with a message glued to it
            line = line.rsplit("]", 1)[1]
        if line := line.strip():
            return line
    return "no message"


def run_child(command: list[str]) -> tuple[int, str]:
    """Run ``command`` with its stdout and stderr passed through; returns (exit code, its last
    message on stderr)."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    tail = b""
    out = getattr(sys.stderr, "buffer", None)
    while chunk := os.read(process.stderr.fileno(), 4096):
        if out is not None:
            out.write(chunk)
            out.flush()
        else:  # a stderr without bytes (captured in tests)
            sys.stderr.write(chunk.decode(errors="replace"))
        tail = (tail + chunk)[-TAIL_BYTES:]
    process.stderr.close()
    return process.wait(), last_message(tail.decode(errors="replace"))
