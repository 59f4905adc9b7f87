"""The one interface every DGP primitive implements.

Conventions (DESIGN.md, "The DGP"): a primitive is a rule on the visible context. At position t
(the current token is ``tokens[:, t]``) it says, for every sequence at once, whether its
condition holds (``fires``), which of its rules fired (``rule``), and its own next-token
distribution (``dist``). The language mixes the rules in priority order; no hidden coin flips.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from devinterp.language.spec import SpecError, Vocab, check_keys, require_probability


@dataclass(frozen=True)
class MinimalContext:
    """The fewest visible tokens that make one rule fire, with their positions; positions not
    listed are empty (zero embedding). The weight-derived headline metric contracts the weights
    with exactly these one-hot tokens (DESIGN.md, "Weight-derived circuits and metrics")."""

    rule: int  # index into the primitive's rule_names
    tokens: tuple[int, ...]
    positions: tuple[int, ...]


@dataclass
class Firing:
    """What a primitive says at one position, for n sequences."""

    fires: np.ndarray  # (n,) bool
    rule: np.ndarray  # (n,) int: index into the primitive's rule_names where it fires
    dist: np.ndarray  # (n, V) float distribution, or (n,) int: a point mass on that token


class Primitive(ABC):
    """A DGP rule type. Subclasses set ``kind`` and register in ``primitives/__init__.py``."""

    kind: ClassVar[str]
    extra_keys: ClassVar[set[str]] = set()
    # headline metric compares distributions over categories instead of tokens
    category_level: ClassVar[bool] = False
    # keep only minimal contexts the language can produce (adjacent tokens with p > 0)
    possible_contexts_only: ClassVar[bool] = False

    def __init__(self, name: str, p: float, vocab: Vocab, rule_names: list[str]):
        self.name = name
        self.p = p
        self.vocab = vocab
        self.rule_names = rule_names
        self.suppresses: tuple[str, ...] = ()  # primitives switched off wherever this one fires

    @classmethod
    def from_spec(cls, spec: dict, vocab: Vocab, field: str) -> "Primitive":
        check_keys(spec, {"type", "name", "p", "suppresses"} | cls.extra_keys, field)
        name = spec.get("name", cls.kind)
        if not isinstance(name, str) or not name or "/" in name:
            raise SpecError(f"{field}.name: expected a non-empty name without '/', got {name!r}")
        p = require_probability(spec.get("p", 1.0), f"{field}.p")
        primitive = cls.parse(spec, vocab, field, name, p)
        suppresses = spec.get("suppresses", [])
        if not isinstance(suppresses, list) or not all(isinstance(s, str) for s in suppresses):
            raise SpecError(f"{field}.suppresses: expected a list of primitive names")
        primitive.suppresses = tuple(suppresses)  # checked against the language's names later
        return primitive

    @classmethod
    @abstractmethod
    def parse(cls, spec: dict, vocab: Vocab, field: str, name: str, p: float) -> "Primitive":
        """Build from the spec's own keys, raising SpecError naming ``field`` on any problem."""

    def check_sequence_length(self, seq_len: int, field: str) -> None:
        """Refuse parameters that cannot work at this sequence length (default: all can)."""

    def begin(self, n: int) -> Any:
        """Per-sequence state before position 0 (default: none)."""
        return None

    @abstractmethod
    def fire(self, state: Any, tokens: np.ndarray, t: int) -> Firing:
        """Condition and distribution at position t; ``tokens`` (n, >t) holds the context.

        Called once per position in increasing t; stateful primitives update ``state`` here.
        """

    def minimal_contexts(self) -> list[MinimalContext]:
        """Contexts for the weight-derived headline metric (default: none, probe metrics only)."""
        return []

    @abstractmethod
    def ground_truth(self) -> dict[str, np.ndarray]:
        """Arrays that define the primitive exactly (tables, rule indices), for export."""


def point_mass(index: np.ndarray, size: int) -> np.ndarray:
    """(n,) int -> (n, size) one-hot float."""
    out = np.zeros((index.shape[0], size))
    out[np.arange(index.shape[0]), index] = 1.0
    return out
