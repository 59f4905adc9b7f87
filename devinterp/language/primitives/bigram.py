"""Token bigram tables: a source token fixes the next-token distribution.

Example (seed language), ``alice: {sees: .7, helps: .2, finds: .1}``::

    .         alice      sees
    category  category   bigram(alice)

"sees" is labelled ``bigram`` (rule ``alice``); it had probability .7.
"""

from __future__ import annotations

import numpy as np

from devinterp.language.primitive import Firing, MinimalContext, Primitive, RowTable, RuleSupport, support
from devinterp.language.spec import Vocab, token_table


class Bigram(Primitive):
    kind = "bigram"
    blind_orders = (0,)  # it reads the current token
    extra_keys = {"table"}

    def __init__(self, name: str, p: float, vocab: Vocab, sources: list[int], table: np.ndarray):
        super().__init__(name, p, vocab, rule_names=[vocab.tokens[s] for s in sources])
        self.sources = np.array(sources)  # (n_rules,) source token ids
        self.table = table  # (V, V); rows of non-sources are zero
        self.rows = RowTable(table)
        self.rule_of_token = np.full(vocab.size, -1)
        self.rule_of_token[self.sources] = np.arange(len(sources))

    @classmethod
    def parse(cls, spec, vocab, field, name, p):
        table, sources = token_table(spec.get("table"), f"{field}.table", vocab)
        return cls(name, p, vocab, sources, table)

    def fire(self, state, tokens, t):
        current = tokens[:, t]
        rule = self.rule_of_token[current]
        return Firing(fires=rule >= 0, rule=rule, dist=current, table=self.rows)

    def rule_supports(self):
        return [RuleSupport((frozenset({int(s)}),), support(self.table[s])) for s in self.sources]

    def minimal_contexts(self):
        return [MinimalContext(r, (int(s),), (0,)) for r, s in enumerate(self.sources)]

    def ground_truth(self):
        return {"sources": self.sources, "table": self.table}
