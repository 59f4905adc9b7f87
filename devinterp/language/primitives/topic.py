"""Context-sensitive transitions: the most recent topic token picks the bigram table in force.

Each topic names a marker token and a bigram table. Once a marker has occurred (at or before
the current position), the latest one's table gives the next token whenever the current token
has a row in it (with probability p; otherwise the next rule down decides).

Example, topics ``beach: {the: {big: .5, new: .5}}`` and ``office: {the: {old: .5, small: .5}}``::

    alice  sees  a  beach  .  bob  finds  the  big
                    ^ topic beach         ^    topic(beach)

After "beach" the word "the" is followed by "big" or "new"; after an "office" it would be
followed by "old" or "small".
"""

from __future__ import annotations

import numpy as np

from devinterp.language.arrays import NUMPY, arrays_of
from devinterp.language.primitive import Firing, MinimalContext, Primitive, RowTable, RuleSupport, support
from devinterp.language.spec import require_mapping, token_table

NONE = -1  # no topic yet


class Topic(Primitive):
    kind = "topic"
    extra_keys = {"topics"}

    def __init__(self, name, p, vocab, markers: list[int], tables: np.ndarray):
        super().__init__(name, p, vocab, rule_names=[vocab.tokens[m] for m in markers])
        self.markers = np.array(markers)  # (n_topics,) marker token ids
        self.tables = tables  # (n_topics, V, V); rows of tokens without a row are zero
        self.has_row = tables.sum(-1) > 0  # (n_topics, V)
        self.rows = RowTable(tables)  # row topic * V + current token
        self.topic_of_token = np.full(vocab.size, NONE)
        self.topic_of_token[self.markers] = np.arange(len(markers))

    @classmethod
    def parse(cls, spec, vocab, field, name, p):
        topics = require_mapping(spec.get("topics"), f"{field}.topics")
        markers, tables = [], []
        for marker, rows in topics.items():
            where = f"{field}.topics.{marker}"
            markers.append(vocab.token_id(marker, where))
            tables.append(token_table(rows, where, vocab)[0])
        return cls(name, p, vocab, markers, np.stack(tables))

    def begin(self, n, xp=NUMPY):
        return xp.full(n, NONE)  # the topic in force

    def fire(self, topic, tokens, t):
        current = tokens[:, t]
        marker = self.topic_of_token[current]
        topic[:] = arrays_of(tokens).where(marker != NONE, marker, topic)
        active = topic != NONE
        fires = active & self.has_row[topic.clip(min=0), current]
        rule = arrays_of(tokens).where(fires, topic, -1)
        return Firing(
            fires=fires, rule=rule, dist=topic.clip(min=0) * self.vocab.size + current, table=self.rows
        )

    def rule_supports(self):
        """Topic r needs its marker and a token with a row in its table."""
        return [
            RuleSupport(
                (frozenset({int(marker)}), frozenset(np.flatnonzero(self.has_row[r]).tolist())),
                support(self.tables[r]),
            )
            for r, marker in enumerate(self.markers)
        ]

    def minimal_contexts(self):
        """The marker, then a token with a row in its table at distance d = 1..8."""
        out = []
        for r, marker in enumerate(self.markers.tolist()):
            for source in np.flatnonzero(self.has_row[r]).tolist():
                out += [MinimalContext(r, (marker, source), (0, d)) for d in range(1, 9)]
        return out

    def ground_truth(self):
        return {"markers": self.markers, "tables": self.tables}
