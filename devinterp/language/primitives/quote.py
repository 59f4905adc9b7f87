"""Quotes: a span with its own transitions and a matching close.

Once the ``open`` token occurs (produced by the rules below, e.g. a bigram row), every next token
until the ``close`` is the quote's: the close with probability ``p_close``, otherwise a content
token from the quote's own ``table`` row for the current token, or from ``content`` when the
current token has none. The close ends the span. With ``suppresses: [skip_trigram]`` (a key any
primitive may have) skip-trigrams are off inside quotes: their positions go to the next rule
down that is not switched off.

Example (p_close .3, content {big: .5, old: .5}), with ``said`` producing the open ``<<``::

    alice  said  <<     big    old    >>     .
                 ^open  quote  quote  quote  category

Inside the quote "big" and "old" come from the quote's content; ">>" closes it.
"""

from __future__ import annotations

import numpy as np

from devinterp.language.arrays import NUMPY, arrays_of
from devinterp.language.primitive import Firing, MinimalContext, Primitive, RowTable, RuleSupport, support
from devinterp.language.spec import SpecError, distribution, require_probability, token_table


class Quote(Primitive):
    kind = "quote"
    extra_keys = {"open", "close", "p_close", "content", "table"}

    def __init__(
        self,
        name,
        p,
        vocab,
        open_token: int,
        close_token: int,
        p_close: float,
        content: np.ndarray,
        table: np.ndarray,
    ):
        super().__init__(name, p, vocab, rule_names=["inside"])
        self.open_token, self.close_token, self.p_close = open_token, close_token, p_close
        rows = np.where(table.sum(-1, keepdims=True) > 0, table, content[None, :])  # (V, V)
        close = np.zeros(vocab.size)
        close[close_token] = 1.0
        self.next_inside = p_close * close[None, :] + (1 - p_close) * rows  # (V, V): row = current token
        self.rows = RowTable(self.next_inside)

    @classmethod
    def parse(cls, spec, vocab, field, name, p):
        open_token = vocab.token_id(spec.get("open"), f"{field}.open")
        close_token = vocab.token_id(spec.get("close"), f"{field}.close")
        if open_token == close_token:
            raise SpecError(f"{field}.close: must differ from open (a close must match an open)")
        p_close = require_probability(spec.get("p_close"), f"{field}.p_close")
        if p_close == 0:
            raise SpecError(f"{field}.p_close: must be above 0, or a quote never ends")
        content = distribution(spec.get("content"), f"{field}.content", vocab.token_id, vocab.size)
        table = (
            token_table(spec["table"], f"{field}.table", vocab)[0]
            if "table" in spec
            else np.zeros((vocab.size,) * 2)
        )
        for where, dist in [(f"{field}.content", content)] + [(f"{field}.table", row) for row in table]:
            if dist[[open_token, close_token]].sum() > 0:
                raise SpecError(f"{where}: the open and close tokens cannot be quote content")
        return cls(name, p, vocab, open_token, close_token, p_close, content, table)

    def begin(self, n, xp=NUMPY):
        return xp.zeros(n, xp.bool)  # inside a quote

    def fire(self, inside, tokens, t):
        current = tokens[:, t]
        closes = inside & (current == self.close_token)
        inside[:] = (inside & ~closes) | (current == self.open_token)
        xp = arrays_of(tokens)
        return Firing(fires=xp.copy(inside), rule=xp.where(inside, 0, -1), dist=current, table=self.rows)

    def rule_supports(self):
        return [RuleSupport((frozenset({self.open_token}),), support(self.next_inside))]

    def open_positions(self, tokens: np.ndarray) -> np.ndarray:
        """(n, T) tokens -> (n, T): position of the open in force after token t, -1 outside."""
        n, T = tokens.shape
        out = np.full((n, T), -1)
        inside, where = np.zeros(n, dtype=bool), np.full(n, -1)
        for t in range(T):
            current = tokens[:, t]
            closes = inside & (current == self.close_token)
            inside[closes] = False
            opens = current == self.open_token
            inside[opens], where[opens] = True, t
            out[:, t] = np.where(inside, where, -1)
        return out

    def minimal_contexts(self):
        """The open token: what follows it is the quote's."""
        return [MinimalContext(0, (self.open_token,), (0,))]

    def ground_truth(self):
        return {
            "open": np.array(self.open_token),
            "close": np.array(self.close_token),
            "next_inside": self.next_inside,
        }
