"""User errors: a bad argument, config value, folder or file.

Every check names the field (``model.n_layers``) or the file and what is wrong, so the command
line can print it as one line (``devinterp: error: model.n_layers: must be at least 1, got 0``).
"""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """A bad argument, config value, folder or file; the message names it and what is wrong."""


def at_least(value: float, minimum: float, field: str) -> None:
    if not value >= minimum:
        raise UsageError(f"{field}: must be at least {minimum}, got {value}")


def one_of(value: object, allowed: tuple, field: str) -> None:
    if value not in allowed:
        raise UsageError(f"{field}: must be one of {', '.join(map(str, allowed))}, got {value!r}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (printed as one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message}")
