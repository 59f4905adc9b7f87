"""Quiet the start-up lines of libraries that say nothing about the run.

Each filter names one message and where it comes from; every other warning and log line still
shows. W&B's "The anonymous setting has no effect" still shows once per run: Lightning passes
``anonymous=None`` to ``wandb.init``, W&B warns about any value, and W&B prints it through its own
terminal writer, which no public filter reaches; the CLI no longer edits the logger's private
init arguments to avoid it.
"""

from __future__ import annotations

import logging
import warnings

LIGHTNING_TIP = "💡 Tip: For seamless cloud logging"  # Lightning advertises its own logger at every fit


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIP)


def quiet_known_noise() -> None:
    """Drop Lightning's logger advertisement and its use of a torch pytree class that torch now
    deprecates (Lightning's code, not ours: lightning/pytorch/utilities/_pytree.py)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTip) for f in logger.filters):
        logger.addFilter(_DropLightningTip())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
