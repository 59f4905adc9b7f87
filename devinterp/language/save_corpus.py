"""Write a corpus file from another generator's output: ``save_corpus``.

The generator's sequences and labels come as strings or ids, in lists or arrays; this maps
strings to ids (``token_strings`` and ``label_names`` in order of first appearance unless
given), checks the result exactly as ``--data.language corpus.npz`` will read it
(corpus.parse_corpus), and only then writes the .npz, so a bad input leaves no file behind and
raises one SpecError naming the argument, sequence and position.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from devinterp.language.corpus import parse_corpus
from devinterp.language.language import START
from devinterp.language.spec import SpecError


def save_corpus(
    path: str | Path,
    sequences: Sequence[Sequence[str | int]] | np.ndarray,
    labels: Sequence[Sequence[str | int]] | np.ndarray,
    logp: Sequence[Sequence[float]] | np.ndarray | None = None,
    token_strings: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``path`` (.npz) and return it.

    sequences: (N, T) tokens, strings or ids; every sequence of one length.
    labels: (N, T) the rule that produced each token, strings or ids into ``label_names``. The
        label of token 0 is never used (it is not predicted); ``start`` there is accepted and
        stands for it, but ``start`` is reserved and may label no other token.
    logp: optional (N, T) exact log p(token t | tokens < t) under the generator.
    token_strings: the vocabulary in id order (needed for id tokens with names; for string
        tokens it fixes the ids, and a token missing from it is an error).
    """
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise SpecError(f"{path}: save_corpus writes .npz files; name the file <name>.npz")
    if path.exists() and not overwrite:
        raise SpecError(f"{path}: the file already exists (pass overwrite=True to replace it)")
    tokens, token_names = _ids(sequences, token_strings, "sequences", "token_strings")
    label_ids, names = _label_ids(labels, label_names)
    if label_ids.shape != tokens.shape:
        raise SpecError(f"labels: shape {label_ids.shape} does not match sequences {tokens.shape}")
    arrays = {"tokens": tokens, "labels": label_ids, "label_names": np.array(names)}
    if token_names is not None:
        arrays["token_strings"] = np.array(token_names)
    if logp is not None:
        arrays["logp"] = _rectangular(logp, "logp", float)
    parse_corpus(arrays, str(path))  # what the trainer will check, before anything is written
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)
    return path


def _rectangular(rows, field: str, kind=None) -> np.ndarray:
    """A list of equal-length rows (or an array) as a 2-D array."""
    if not isinstance(rows, np.ndarray):
        rows = [list(r) for r in rows]
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            n = next(i for i, r in enumerate(rows) if len(r) != len(rows[0]))
            raise SpecError(
                f"{field}: sequence {n} has {len(rows[n])} entries, sequence 0 has {len(rows[0])}; "
                "cut or pad them to one length"
            )
    array = np.asarray(rows) if kind is None else np.asarray(rows, dtype=kind)
    if array.ndim != 2:
        raise SpecError(f"{field}: expected (sequences, tokens), got shape {array.shape}")
    return array


def _ids(rows, given: Sequence[str] | None, field: str, names_field: str) -> tuple[np.ndarray, list | None]:
    """(N, T) ids, and the strings they index (None: ids given without names)."""
    array = _rectangular(rows, field)
    if array.dtype.kind in "iu":
        return array.astype(np.int64), (list(given) if given is not None else None)
    if array.dtype.kind not in "USO":
        raise SpecError(f"{field}: expected strings or integer ids, got {array.dtype}")
    strings = array.astype(str)
    names = list(given) if given is not None else list(dict.fromkeys(strings.ravel().tolist()))
    index = {name: i for i, name in enumerate(names)}
    missing = ~np.isin(strings, list(index))
    if missing.any():
        n, t = np.argwhere(missing)[0]
        raise SpecError(f"{field}: sequence {n}, token {t}: {str(strings[n, t])!r} is not in {names_field}")
    return np.vectorize(index.__getitem__, otypes=[np.int64])(strings), names


def _label_ids(labels, label_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    array = _rectangular(labels, "labels")
    if array.dtype.kind in "iu":
        if label_names is None:
            raise SpecError("label_names: integer labels need their names (label_names=[...])")
        return array.astype(np.int64), list(label_names)
    strings = array.astype(str)
    later = strings[:, 1:] == START
    if later.any():
        n, t = np.argwhere(later)[0]
        raise SpecError(
            f"labels: sequence {n}, token {t + 1}: {START!r} is reserved for position 0, which is never "
            "predicted; rename that label"
        )
    body = strings[:, 1:].ravel().tolist()
    names = list(label_names) if label_names is not None else list(dict.fromkeys(body))
    if not names:
        raise SpecError("labels: no token after position 0 has a label")
    first = np.where(strings[:, :1] == START, names[0], strings[:, :1])  # token 0's label is never used
    strings = np.concatenate([first, strings[:, 1:]], axis=1)
    ids, _ = _ids(strings, names, "labels", "label_names")
    return ids, names
