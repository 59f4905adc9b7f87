"""The tiny run most training tests build: the data, the module and a quiet Trainer, in one place.

Defaults: the seed language, sequences of 16, batches of 4, 2 members, a probe of 8 sequences,
2 layers of 2 heads, d_model 16, d_head 8, a 2-step warm-up; a test passes only what differs.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from devinterp.data import ToyLanguageData
from devinterp.module import TensorTransformerModule
from tests.conftest import SEED_SPEC_PATH


def tiny_parts(
    language: str | Path = SEED_SPEC_PATH,
    *,
    seq_len: int = 16,
    n_members: int = 2,
    seed: int = 0,
    batch_size: int = 4,
    probe_size: int = 8,
    steps_per_block: int = 4,
    data: dict | None = None,
    **model,
) -> tuple[ToyLanguageData, TensorTransformerModule]:
    """(data, module): ``data`` holds further ToyLanguageData options, ``model`` further (or other)
    TensorTransformerModule ones."""
    datamodule = ToyLanguageData(
        language=str(language),
        seq_len=seq_len,
        batch_size=batch_size,
        n_members=n_members,
        seed=seed,
        probe_size=probe_size,
        steps_per_block=steps_per_block,
        **(data or {}),
    )
    options = {"n_layers": 2, "n_heads": 2, "d_model": 16, "d_head": 8, "warmup_steps": 2, **model}
    module = TensorTransformerModule(
        d_vocab=datamodule.d_vocab,
        n_ctx=seq_len,
        label_names=datamodule.label_names,
        n_members=n_members,
        seed=seed,
        **options,
    )
    return datamodule, module


def tiny_trainer(max_steps: int, root: str | Path | None = None, callbacks=(), **options) -> L.Trainer:
    """A CPU Trainer with no logger, checkpoint, progress bar, summary or validation, unless
    ``options`` say otherwise."""
    defaults = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "accelerator": "cpu",
    }
    return L.Trainer(
        max_steps=max_steps,
        default_root_dir=None if root is None else str(root),
        callbacks=list(callbacks),
        **{**defaults, **options},
    )
