"""The one interface every DGP primitive implements.

Conventions (docs/architecture.md): a primitive is a rule on the visible context. At position t
(the current token is ``tokens[:, t]``) it says, for every sequence at once, whether its
condition holds (``fires``), which of its rules fired (``rule``), and its own next-token
distribution (``dist``). The language mixes the rules in priority order; no hidden coin flips.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from devinterp.language.arrays import NUMPY, Array, NumpyArrays, TorchArrays, arrays_of
from devinterp.language.spec import SpecError, Vocab, check_keys, require_probability


@dataclass(frozen=True)
class MinimalContext:
    """The fewest visible tokens that make one rule fire, with their positions; positions not
    listed are empty (zero embedding). The weight-derived headline metric contracts the weights
    with exactly these one-hot tokens (docs/guides/training.md, "What is measured")."""

    rule: int  # index into the primitive's rule_names
    tokens: tuple[int, ...]
    positions: tuple[int, ...]


class RowTable:
    """Next-token distributions kept as the rows of one table, with their running sums for
    drawing; a firing that uses the table names one row per sequence instead of copying it."""

    def __init__(self, probs: np.ndarray):
        self.probs = np.ascontiguousarray(probs.reshape(-1, probs.shape[-1]))  # (rows, V)
        self.cdf = np.cumsum(self.probs, axis=1)  # (rows, V)

    def on(self, xp: TorchArrays) -> "RowTable":
        """The same table with its arrays on xp's device."""
        table = copy.copy(self)
        table.probs, table.cdf = xp.convert(self.probs), xp.convert(self.cdf)
        return table

    def draw(self, rows: Array, uniform: Array) -> Array:
        """One token from each named row (n,) by inverse CDF from uniforms in [0, 1) (n,)."""
        return inverse_cdf(self.cdf[rows], uniform)


def inverse_cdf(cdf: Array, uniform: Array) -> Array:
    """One index per row of running sums cdf (n, V) from uniforms in [0, 1) (n,): the first entry
    above ``uniform`` times the row's total (so a p = 0 entry is never drawn)."""
    index = (cdf <= (uniform * cdf[:, -1])[:, None]).sum(axis=1)
    return index.clip(max=cdf.shape[1] - 1)


@dataclass(frozen=True)
class RuleSupport:
    """What one rule needs in order to fire and what it can emit, for the fixpoint that finds
    rules no sequence can ever fire (devinterp/language/reachability.py). The rule can fire only
    if, for every set in ``needs``, some token of the set can occur; firing, it can put any token
    of ``emits`` next. Both over-approximate (order, distance and priority are ignored), so a
    rule found impossible is impossible."""

    needs: tuple[frozenset[int], ...]
    emits: frozenset[int]


def support(row: np.ndarray) -> frozenset[int]:
    """The tokens a distribution (or a stack of them, their union) gives positive probability."""
    row = np.asarray(row).reshape(-1, np.asarray(row).shape[-1])
    return frozenset(np.flatnonzero(row.sum(0) > 0).tolist())


def triple_supports(rules: np.ndarray) -> list[RuleSupport]:
    """Rules (n_rules, 3) of two context tokens and an output (skip-, long-range and token
    trigrams): each needs both tokens and emits its output."""
    return [RuleSupport((frozenset({a}), frozenset({b})), frozenset({c})) for a, b, c in rules.tolist()]


@dataclass(frozen=True)
class TrigramPush:
    """A weight diagnostic a primitive asks for: per rule (anchor A, trigger B, output C), the
    z-score of the QK-OV push on C from A against other anchors, and C's rank among the outputs
    pushed from (B, A), averaged over ``offsets`` (computed by devinterp.metrics.weights.Diagnostics)."""

    rules: np.ndarray  # (n_rules, 3): anchor, trigger, output token ids
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class InductionCircuit:
    """A weight diagnostic a primitive asks for: previous-token scores of layer-0 heads, copying
    scores of last-layer heads, and the circuit score combining them through K-composition."""


WeightDiagnostic = TrigramPush | InductionCircuit


@dataclass(frozen=True)
class QKView:
    """The QK slice that shows a primitive's mechanism: the pattern from each query token to each
    key token, averaged over ``offsets`` (query position minus key position; ``last_offset`` None
    means up to the context length). Drawn by ``devinterp analyze``."""

    queries: tuple[int, ...]
    keys: tuple[int, ...]
    first_offset: int
    last_offset: int | None
    query_role: str = "query"
    key_role: str = "key"

    def offsets(self, n_ctx: int) -> list[int]:
        last = n_ctx - 1 if self.last_offset is None else min(self.last_offset, n_ctx - 1)
        return list(range(self.first_offset, last + 1))


@dataclass
class Firing:
    """What a primitive says at one position, for n sequences."""

    fires: Array  # (n,) bool
    rule: Array  # (n,) int: index into the primitive's rule_names where it fires
    dist: Array  # (n,) int: a point mass on that token, or with ``table`` the row to read
    table: RowTable | None = None
    probs: Array | None = None  # (n, V): each sequence's own distribution (``dist`` unused)

    def dense(self, where: np.ndarray, size: int) -> np.ndarray:
        """(len(where), size) distributions of the sequences ``where``."""
        if self.probs is not None:
            return self.probs[where]
        if self.table is not None:
            return self.table.probs[self.dist[where]]
        return point_mass(self.dist[where], size)

    def prob(self, token: Array) -> Array:
        """(n,) probability this distribution gives to each sequence's ``token``."""
        xp = arrays_of(token)
        if self.probs is not None:
            return self.probs[xp.arange(len(token)), token]
        if self.table is not None:
            return self.table.probs[self.dist, token]
        return xp.as_float(self.dist == token)

    def draw(self, where: Array, uniform: Array) -> Array:
        """Tokens of the sequences ``where`` by inverse CDF from uniforms in [0, 1)."""
        if self.probs is not None:
            return inverse_cdf(arrays_of(uniform).cumsum(self.probs[where], axis=1), uniform)
        if self.table is None:
            return self.dist[where]
        return self.table.draw(self.dist[where], uniform)


class Primitive(ABC):
    """A DGP rule type. A subclass sets ``kind`` (its spec ``type``) and is registered by
    defining it: a new file in ``primitives/`` is found without editing a list.

    Hooks the metrics read (defaults: none): ``minimal_contexts`` (the weight-derived headline
    metric), ``weight_diagnostics`` (mechanism diagnostics), ``open_positions`` (span primitives:
    attention to the open on the probe set), ``qk_view`` (the report's QK figure).
    """

    registry: ClassVar[dict[str, type["Primitive"]]] = {}
    kind: ClassVar[str]
    extra_keys: ClassVar[set[str]] = set()
    # headline metric compares distributions over categories instead of tokens
    category_level: ClassVar[bool] = False
    # keep only minimal contexts the language can produce (adjacent tokens with p > 0)
    possible_contexts_only: ClassVar[bool] = False
    # weigh minimal contexts by how often the language produces them (0: left out)
    weigh_contexts_by_occurrence: ClassVar[bool] = False
    # the context-limited oracles (devinterp/language/oracles.py) that cannot read what this
    # primitive needs, so its mechanism-blind baseline may use them: a primitive that reads
    # further back than the last two tokens admits orders 0-2
    blind_orders: ClassVar[tuple[int, ...]] = (0, 1, 2)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None:
            if kind in Primitive.registry and Primitive.registry[kind] is not cls:
                raise TypeError(
                    f"primitive kind {kind!r} is defined twice ({Primitive.registry[kind].__name__}, "
                    f"{cls.__name__})"
                )
            Primitive.registry[kind] = cls

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

    def begin(self, n: int, xp: NumpyArrays | TorchArrays = NUMPY) -> Any:
        """Per-sequence state before position 0, made with ``xp`` (default: none)."""
        return None

    @abstractmethod
    def fire(self, state: Any, tokens: Array, t: int) -> Firing:
        """Condition and distribution at position t; ``tokens`` (n, >t) holds the context.

        Called once per position in increasing t; stateful primitives update ``state`` here.
        ``tokens`` is a numpy array or, for a primitive moved ``on`` a device, a tensor there:
        the code is written once for both (devinterp/language/arrays.py).
        """

    def on(self, xp: TorchArrays) -> "Primitive":
        """This primitive with every table (numpy array or RowTable attribute) on xp's device,
        for the device sampler; the numpy original is untouched."""
        moved = copy.copy(self)
        for key, value in vars(self).items():
            if isinstance(value, np.ndarray):
                setattr(moved, key, xp.convert(value))
            elif isinstance(value, RowTable):
                setattr(moved, key, value.on(xp))
        return moved

    def check_place(self, above: list["Primitive"], below: list["Primitive"], field: str) -> None:
        """Refuse a place in the priority order this primitive cannot be exact at (``above`` and
        ``below``: the primitives before and after it; default: any place works)."""

    def took_positions(self, state: Any, took: Array) -> None:
        """Told, after every ``fire``, where this primitive labelled the position (n,) bool: it
        fired, was not suppressed and no higher rule took the position. Default: not needed."""

    def strategies(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Named exact predictors from visible tokens that the strategy curves compare the model
        with on this primitive's positions (besides the uniform, context-limited oracle and
        knock-out ones every primitive gets): (n, T) tokens -> name -> (n, T, V), entry t the
        prediction of token t + 1. Default: none."""
        return {}

    def rule_supports(self) -> list[RuleSupport]:
        """Per rule, the tokens it needs and may emit (devinterp/language/reachability.py). The
        default, for a primitive that does not say, needs nothing and may emit any token."""
        everything = frozenset(range(self.vocab.size))
        return [RuleSupport((), everything) for _ in self.rule_names]

    def minimal_contexts(self) -> list[MinimalContext]:
        """Contexts for the weight-derived headline metric (default: none, probe metrics only)."""
        return []

    def weight_diagnostics(self) -> list[WeightDiagnostic]:
        """Mechanism diagnostics read from the weights for this primitive (default: none)."""
        return []

    def open_positions(self, tokens: np.ndarray) -> np.ndarray | None:
        """Span primitives (quotes, brackets): (n, T) tokens -> (n, T) position of the open in
        force after token t, -1 outside a span. Others: None."""
        return None

    def qk_view(self) -> QKView | None:
        """The QK slice the report draws for this primitive (default: none)."""
        return None

    @abstractmethod
    def ground_truth(self) -> dict[str, np.ndarray]:
        """Arrays that define the primitive exactly (tables, rule indices), for export."""


def point_mass(index: np.ndarray, size: int) -> np.ndarray:
    """(n,) int -> (n, size) one-hot float."""
    out = np.zeros((index.shape[0], size))
    out[np.arange(index.shape[0]), index] = 1.0
    return out
