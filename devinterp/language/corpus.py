"""A corpus made elsewhere: token sequences from another generator, with per-token labels.

A corpus stands where a language spec would (``--data.language corpus.npz``) when the tokens
come from a generator outside this package. The file, .npz or HDF5 (.h5, .hdf5), holds:

- ``tokens`` (N, T) integers in [0, V): N sequences of T tokens;
- ``labels`` (N, T) integers in [0, len(label_names)): label t describes token t (the rule
  that produced it), as in a language's samples; the label of token 0 is never used;
- ``label_names`` (n_labels,) strings;
- optional ``token_strings`` (V,) strings, which also fix the vocabulary size V;
- optional ``vocab_size`` (a scalar): V when there are no token strings (else max token + 1);
- optional ``logp`` (N, T) floats: the exact log p(token t | tokens < t) under the generator.

Inside, label 0 is ``start`` (position 0, never predicted) and the corpus's labels follow, as
a language numbers them, so per-label training and probe losses work unchanged.
``split(probe_size, seed)`` holds out a seeded choice of sequences as the probe set; training
streams walk the rest, each member in its own order per epoch. What needs ground truth a corpus
lacks (weight-derived headline metrics: no rules; exact excess loss: no distributions) is left
out; with ``logp`` the probe set's excess loss is the log-likelihood gap on the token that came
next, whose mean over positions estimates the KL (its expectation under the generator).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from devinterp.language.language import START, Sample
from devinterp.language.spec import SpecError, Vocab

CORPUS_SUFFIXES = (".npz", ".h5", ".hdf5")
REQUIRED = ("tokens", "labels", "label_names")
OPTIONAL = ("token_strings", "vocab_size", "logp")
LOGP_TOLERANCE = 1e-6


def is_corpus_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in CORPUS_SUFFIXES


class Corpus:
    """Sequences, labels and (optionally) exact log-probabilities read from a file."""

    primitives: list = []  # no rules with known circuits: no weight-derived headline metrics
    rule_names: list[str] = []

    def __init__(
        self,
        name: str,
        vocab: Vocab,
        label_names: list[str],
        tokens: np.ndarray,
        labels: np.ndarray,
        logp: np.ndarray | None,
        source: str = "<corpus>",
        digest: str = "",
    ):
        self.name, self.vocab, self.source, self.digest = name, vocab, source, digest
        self.label_names = [START] + list(label_names)
        self.tokens = tokens  # (N, T) int64
        self.labels = labels + 1  # (N, T) int64, in this numbering (0 = start)
        self.labels[:, 0] = 0
        self.logp = logp  # (N, T) float64 or None
        self.seq_len: int | None = None
        self.split(0, 0)

    @property
    def d_vocab(self) -> int:
        return self.vocab.size

    @property
    def has_logp(self) -> bool:
        return self.logp is not None

    def check_sequence_length(self, seq_len: int) -> None:
        """Sequences are cut to their first seq_len tokens (a prefix keeps every label and logp)."""
        if not 2 <= seq_len <= self.tokens.shape[1]:
            raise SpecError(
                f"data.seq_len: must be between 2 and the corpus's sequence length "
                f"{self.tokens.shape[1]} ({self.source}), got {seq_len}"
            )
        self.seq_len = seq_len

    def split(self, probe_size: int, seed: int) -> None:
        """Hold out ``probe_size`` sequences (a seeded choice) as the probe set; train on the rest."""
        N = self.tokens.shape[0]
        if probe_size >= N:
            raise SpecError(
                f"data.probe_size: holding out {probe_size} sequences leaves none of the "
                f"{N} in {self.source} for training"
            )
        held_out = np.sort(np.random.default_rng(seed).permutation(N)[:probe_size])
        self.probe_rows = held_out
        self.train_rows = np.setdiff1d(np.arange(N), held_out)

    def _sample(self, rows: np.ndarray, seq_len: int) -> Sample:
        T = slice(0, seq_len)
        logp = self.logp[rows, T] if self.logp is not None else np.full((len(rows), seq_len), np.nan)
        return Sample(self.tokens[rows, T], self.labels[rows, T], logp, np.full((len(rows), seq_len), -1))

    def held_out(self, seq_len: int) -> Sample:
        """The probe set: the held-out sequences, in file order."""
        return self._sample(self.probe_rows, seq_len)

    def stream_block(
        self, n: int, seq_len: int, stream_seeds: list, block_index: int, device: None = None
    ) -> list[Sample]:
        """Sequences [block_index * n, (block_index + 1) * n) of each stream: stream s reads the
        training sequences epoch after epoch, epoch e in the order ``permutation([s, e])``. A
        corpus is read on the host (``device`` is None: data.sampler device refuses a corpus)."""
        n_train = len(self.train_rows)
        position = np.arange(block_index * n, (block_index + 1) * n)
        epoch, offset = np.divmod(position, n_train)
        first = int(epoch[0])
        out = []
        for seed in stream_seeds:
            orders = np.stack(
                [
                    np.random.default_rng([seed, e]).permutation(n_train)
                    for e in range(first, int(epoch[-1]) + 1)
                ]
            )  # (epochs touched, n_train)
            out.append(self._sample(self.train_rows[orders[epoch - first, offset]], seq_len))
        return out

    def knock_out(self, names: list[str]):
        raise SpecError(f"data.knockout: {self.source} is a corpus: it has no primitives to knock out")

    def only(self, names: list[str]):
        raise SpecError(f"data.knockin: {self.source} is a corpus: it has no primitives to train on alone")

    def decode(self, tokens: np.ndarray) -> list[str]:
        return [self.vocab.tokens[i] for i in np.asarray(tokens).tolist()]

    def ground_truth(self) -> dict[str, np.ndarray]:
        return {"corpus/probe_rows": self.probe_rows}

    def describe(self) -> str:
        """What the timeline keeps in place of a spec (the file itself is not copied)."""
        N, T = self.tokens.shape
        names = ", ".join(self.label_names[1:])
        return (
            f"corpus: {self.source}\nsha256: {self.digest}\nsequences: {N}\ntokens_per_sequence: {T}\n"
            f"vocab_size: {self.d_vocab}\nlabels: [{names}]\nlogp: {str(self.has_logp).lower()}\n"
        )

    def notice(self) -> str:
        """The one line that says what this corpus cannot measure."""
        lacks = "no rules with known circuits, so no weight-derived headline metrics"
        if self.has_logp:
            return (
                f"{self.source}: a corpus: {lacks}; probe excess loss is the log-likelihood gap on "
                "the token that came next (from the corpus's logp)"
            )
        return (
            f"{self.source}: a corpus: {lacks}; no logp, so no excess loss: the probe set reports "
            "cross-entropy and top-1 accuracy against the token that came next"
        )


# ---- reading and checking the file -------------------------------------------------------------


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {}
            for key in archive.files:
                try:
                    arrays[key] = archive[key]
                except ValueError:  # an object array: would need pickle
                    raise SpecError(
                        f"{path}: {key}: stored as Python objects; store strings as a fixed-width "
                        "array (np.array(names, dtype=str))"
                    ) from None
            return arrays
    except SpecError:
        raise
    except OSError as error:
        raise SpecError(f"{path}: cannot read corpus ({error.strerror or error})") from None
    except (zipfile.BadZipFile, EOFError, ValueError):
        raise SpecError(f"{path}: not a readable .npz file") from None


def _read_hdf5(path: Path) -> dict[str, np.ndarray]:
    import h5py

    if not path.is_file():
        raise SpecError(f"{path}: cannot read corpus (No such file or directory)")
    try:
        with h5py.File(path, "r") as f:
            arrays = {}
            for key, item in f.items():
                if not isinstance(item, h5py.Dataset):
                    raise SpecError(f"{path}: {key}: expected a dataset, found a group")
                value = item[()]
                if item.dtype.kind == "O" or (item.dtype.kind == "S"):  # HDF5 strings arrive as bytes
                    value = np.array(
                        [v.decode() if isinstance(v, bytes) else str(v) for v in np.ravel(value)]
                    )
                arrays[key] = value
            return arrays
    except SpecError:
        raise
    except OSError:
        raise SpecError(f"{path}: not a readable HDF5 file") from None


def _strings(value: np.ndarray, field: str) -> list[str]:
    value = np.asarray(value)
    if value.ndim != 1 or value.dtype.kind not in "US" or len(value) == 0:
        raise SpecError(
            f"{field}: expected a non-empty 1-D array of strings, got {value.dtype} with shape {value.shape}"
        )
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in value.tolist()]
    if any(not n for n in names):
        raise SpecError(f"{field}: empty string at index {names.index('')}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"{field}: duplicate {duplicates[0]!r}")
    return names


def _integers(value: np.ndarray, field: str, shape: tuple | None = None) -> np.ndarray:
    value = np.asarray(value)
    if value.dtype.kind not in "iu":
        raise SpecError(f"{field}: expected integers, got {value.dtype}")
    if shape is not None and value.shape != shape:
        raise SpecError(f"{field}: shape {value.shape} does not match tokens {shape}")
    return value.astype(np.int64)


def parse_corpus(arrays: dict[str, np.ndarray], source: str, digest: str = "") -> Corpus:
    """Check the arrays of a corpus file; every problem raises SpecError naming the file and field."""
    unknown = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise SpecError(f"{source}: unknown array {unknown[0]!r} (allowed: {', '.join(REQUIRED + OPTIONAL)})")
    for key in REQUIRED:
        if key not in arrays:
            raise SpecError(f"{source}: missing required array {key!r}")
    tokens = _integers(arrays["tokens"], f"{source}: tokens")
    if tokens.ndim != 2 or tokens.shape[0] < 2 or tokens.shape[1] < 2:
        raise SpecError(
            f"{source}: tokens: expected shape (sequences, tokens) with at least 2 of each, "
            f"got {tokens.shape}"
        )
    labels = _integers(arrays["labels"], f"{source}: labels", tokens.shape)
    label_names = _strings(arrays["label_names"], f"{source}: label_names")
    if START in label_names:
        raise SpecError(
            f"{source}: label_names: {START!r} is reserved for position 0, which is never predicted; "
            "rename that label"
        )
    if any("/" in n for n in label_names):
        raise SpecError(
            f"{source}: label_names: names cannot contain '/' ({next(n for n in label_names if '/' in n)!r})"
        )
    _in_range(labels, len(label_names), f"{source}: labels", "label ids must be below len(label_names)")
    token_strings = (
        _strings(arrays["token_strings"], f"{source}: token_strings") if "token_strings" in arrays else None
    )
    vocab_size = None
    if "vocab_size" in arrays:
        size = np.asarray(arrays["vocab_size"])
        if size.shape != () or size.dtype.kind not in "iu" or int(size) < 1:
            raise SpecError(f"{source}: vocab_size: expected one positive integer, got {size!r}")
        vocab_size = int(size)
        if token_strings is not None and len(token_strings) != vocab_size:
            raise SpecError(
                f"{source}: vocab_size: {vocab_size} but token_strings has {len(token_strings)} entries"
            )
    V = len(token_strings) if token_strings is not None else vocab_size or int(tokens.max()) + 1
    _in_range(tokens, V, f"{source}: tokens", f"token ids must be below the vocabulary size {V}")
    logp = None
    if "logp" in arrays:
        logp = np.asarray(arrays["logp"])
        if logp.dtype.kind != "f":
            raise SpecError(f"{source}: logp: expected floats, got {logp.dtype}")
        if logp.shape != tokens.shape:
            raise SpecError(f"{source}: logp: shape {logp.shape} does not match tokens {tokens.shape}")
        logp = logp.astype(np.float64)
        bad = ~np.isfinite(logp[:, 1:]) | (logp[:, 1:] > LOGP_TOLERANCE)
        if bad.any():
            n, t = np.argwhere(bad)[0]
            raise SpecError(
                f"{source}: logp: sequence {n}, token {t + 1}: {logp[n, t + 1]} is not a "
                "log-probability (finite, at most 0)"
            )
        logp = np.minimum(logp, 0.0)
    strings = tuple(token_strings) if token_strings is not None else tuple(f"t{i}" for i in range(V))
    vocab = Vocab(
        tokens=strings,
        categories=("token",),
        token_category=np.zeros(V, dtype=np.int64),
        within_category=np.full(V, 1.0 / V),
    )
    return Corpus(Path(source).stem, vocab, label_names, tokens, labels, logp, source, digest)


def _in_range(values: np.ndarray, size: int, field: str, rule: str) -> None:
    bad = (values < 0) | (values >= size)
    if bad.any():
        n, t = np.argwhere(bad)[0]
        raise SpecError(f"{field}: sequence {n}, token {t}: {values[n, t]} is out of range ({rule})")


def load_corpus(path: str | Path) -> Corpus:
    """Read and check a corpus file (.npz, .h5, .hdf5); raises SpecError naming the file and field."""
    path = Path(path)
    arrays = _read_npz(path) if path.suffix.lower() == ".npz" else _read_hdf5(path)
    return parse_corpus(arrays, str(path), hashlib.sha256(path.read_bytes()).hexdigest())
