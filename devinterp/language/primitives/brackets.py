"""Nested brackets: k bracket types, nesting up to a depth limit, every close matching the most
recent open.

Once an open token occurs (at the top level it is produced by the rules below, e.g. a bigram
row), every next token until the matching close is the brackets': the close of the most recent
open with probability ``p_close``, a new open (a type drawn uniformly) with probability
``p_open`` while the depth is below ``max_depth``, otherwise a content token (the ``table`` row
of the current token, or ``content``). Content inside brackets follows its own transitions.
The rule that fires is the type of the innermost open bracket.

Example (pairs ``( )`` and ``[ ]``)::

    alice  sees  (     big   [     old   ]     beach  )     .
                 ^open brackets(()  ...  brackets([])   brackets(())

"]" closes the "[" opened last; the ")" after it closes the outer "(".
"""

from __future__ import annotations

import numpy as np

from devinterp.language.arrays import NUMPY, arrays_of
from devinterp.language.primitive import Firing, MinimalContext, Primitive, RowTable, RuleSupport, support
from devinterp.language.spec import SpecError, distribution, require_int, require_probability, token_table


class Brackets(Primitive):
    kind = "brackets"
    extra_keys = {"pairs", "max_depth", "p_open", "p_close", "content", "table"}

    def __init__(
        self,
        name,
        p,
        vocab,
        opens: list[int],
        closes: list[int],
        max_depth: int,
        p_open: float,
        p_close: float,
        content: np.ndarray,
        table: np.ndarray,
    ):
        super().__init__(
            name, p, vocab, rule_names=[vocab.tokens[o] + vocab.tokens[c] for o, c in zip(opens, closes)]
        )
        self.opens, self.closes = np.array(opens), np.array(closes)
        self.max_depth, self.p_open, self.p_close = max_depth, p_open, p_close
        self.content_rows = np.where(table.sum(-1, keepdims=True) > 0, table, content[None, :])  # (V, V)
        self.type_of_open = np.full(vocab.size, -1)
        self.type_of_open[self.opens] = np.arange(len(opens))
        open_mix = np.zeros(vocab.size)
        open_mix[self.opens] = 1.0 / len(opens)
        # next-token distribution inside, by (innermost type, below the depth limit, current token)
        close = np.eye(vocab.size)[self.closes]  # (k, V)
        self.next_inside = np.stack(
            [
                np.stack(
                    [
                        p_close * close[k][None, :]
                        + p_o * open_mix[None, :]
                        + (1 - p_close - p_o) * self.content_rows
                        for p_o in (0.0, p_open)
                    ]
                )
                for k in range(len(opens))
            ]
        )  # (k, 2, V, V)
        self.rows = RowTable(self.next_inside)  # row (type * 2 + below the limit) * V + current token

    @classmethod
    def parse(cls, spec, vocab, field, name, p):
        pairs = spec.get("pairs")
        if (
            not isinstance(pairs, list)
            or not pairs
            or not all(isinstance(q, list) and len(q) == 2 for q in pairs)
        ):
            raise SpecError(f"{field}.pairs: expected a non-empty list of [open, close] token pairs")
        opens = [vocab.token_id(o, f"{field}.pairs[{i}][0]") for i, (o, _) in enumerate(pairs)]
        closes = [vocab.token_id(c, f"{field}.pairs[{i}][1]") for i, (_, c) in enumerate(pairs)]
        if len(set(opens + closes)) != 2 * len(pairs):
            raise SpecError(f"{field}.pairs: every open and close token must be distinct")
        max_depth = require_int(spec.get("max_depth"), f"{field}.max_depth", minimum=1)
        p_open = require_probability(spec.get("p_open", 0.0), f"{field}.p_open")
        p_close = require_probability(spec.get("p_close"), f"{field}.p_close")
        if p_close == 0 or p_open + p_close > 1:
            raise SpecError(
                f"{field}.p_close: must be above 0 and p_open + p_close at most 1, got {p_open} + {p_close}"
            )
        content = distribution(spec.get("content"), f"{field}.content", vocab.token_id, vocab.size)
        table = (
            token_table(spec["table"], f"{field}.table", vocab)[0]
            if "table" in spec
            else np.zeros((vocab.size,) * 2)
        )
        brackets = opens + closes
        if content[brackets].sum() > 0 or table[:, brackets].sum() > 0:
            raise SpecError(
                f"{field}.content: bracket tokens cannot be content (opens and closes come from the rule)"
            )
        return cls(name, p, vocab, opens, closes, max_depth, p_open, p_close, content, table)

    def begin(self, n, xp=NUMPY):
        return xp.zeros((n, self.max_depth + 1), xp.int64)  # [depth, type of open 1, ..., of open max_depth]

    def fire(self, stack, tokens, t):
        xp = arrays_of(tokens)
        current = tokens[:, t]
        rows = xp.arange(len(current))
        depth = stack[:, 0]
        top = stack[rows, depth.clip(min=1)]  # type of the innermost open (meaningless at depth 0)
        closes = (depth > 0) & (current == self.closes[top])
        stack[:, 0] = xp.where(closes, depth - 1, depth)
        kind = self.type_of_open[current]
        opens = (kind >= 0) & (stack[:, 0] < self.max_depth)
        stack[:, 0] = xp.where(opens, stack[:, 0] + 1, stack[:, 0])
        depth = stack[:, 0]
        stack[rows, depth] = xp.where(opens, kind, stack[rows, depth])  # an open's type on the stack
        depth = stack[:, 0]
        inside = depth > 0
        top = stack[rows, depth.clip(min=1)]
        can_open = xp.where(depth < self.max_depth, 1, 0)
        return Firing(
            fires=inside,
            rule=xp.where(inside, top, -1),
            dist=(top * 2 + can_open) * self.vocab.size + current,
            table=self.rows,
        )

    def rule_supports(self):
        """Pair k needs its open and emits its close, any open (when p_open > 0) and content."""
        opens = enumerate(self.opens.tolist())
        return [RuleSupport((frozenset({o}),), support(self.next_inside[k])) for k, o in opens]

    def open_positions(self, tokens: np.ndarray) -> np.ndarray:
        """(n, T) tokens -> (n, T): position of the innermost open in force after token t, -1
        outside brackets (the state ``fire`` keeps, with positions instead of types)."""
        n, T = tokens.shape
        rows = np.arange(n)
        out = np.full((n, T), -1)
        depth = np.zeros(n, dtype=np.int64)
        kinds = np.zeros((n, self.max_depth + 1), dtype=np.int64)
        where = np.full((n, self.max_depth + 1), -1)
        for t in range(T):
            current = tokens[:, t]
            closes = (depth > 0) & (current == self.closes[kinds[rows, np.maximum(depth, 1)]])
            depth[closes] -= 1
            kind = self.type_of_open[current]
            opens = (kind >= 0) & (depth < self.max_depth)
            depth[opens] += 1
            kinds[rows[opens], depth[opens]] = kind[opens]
            where[rows[opens], depth[opens]] = t
            out[:, t] = np.where(depth > 0, where[rows, np.maximum(depth, 1)], -1)
        return out

    def minimal_contexts(self):
        """One open bracket of each type: what follows it is the brackets'."""
        return [MinimalContext(k, (int(o),), (0,)) for k, o in enumerate(self.opens.tolist())]

    def ground_truth(self):
        return {
            "opens": self.opens,
            "closes": self.closes,
            "max_depth": np.array(self.max_depth),
            "p_open": np.array(self.p_open),
            "p_close": np.array(self.p_close),
            "next_inside": self.next_inside,
        }
