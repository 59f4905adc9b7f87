"""Category transitions: the fallback rule, a Markov chain over categories.

The next token's category follows a transition table from the current token's category; the
token is then drawn within that category (uniform unless the spec gives weights).

Example (seed language), with ``NAME -> VERB 1.0``, ``VERB -> DET .6 | NAME .4``::

    dave    helps   the   ...
    start   category(NAME)  category(VERB)

"helps" is labelled ``category`` (rule ``NAME``): after a name with no bigram table of its own,
any verb follows, uniformly.
"""

from __future__ import annotations

import numpy as np

from devinterp.language.arrays import arrays_of
from devinterp.language.primitive import Firing, MinimalContext, Primitive, RowTable, RuleSupport, support
from devinterp.language.spec import SpecError, Vocab, distribution, require_mapping


class CategoryTransition(Primitive):
    kind = "category"
    blind_orders = (0,)  # it reads the current token's category
    extra_keys = {"transitions"}
    category_level = True

    def __init__(self, name: str, p: float, vocab: Vocab, category_table: np.ndarray):
        super().__init__(name, p, vocab, rule_names=list(vocab.categories))
        self.category_table = category_table  # (n_categories, n_categories)
        # (V, V): row u is the next-token distribution after token u
        self.token_table = vocab.category_mixture(category_table[vocab.token_category])
        self.rows = RowTable(self.token_table)
        self.token_category = vocab.token_category  # (V,)

    @classmethod
    def parse(cls, spec, vocab, field, name, p):
        if p != 1.0:
            raise SpecError(f"{field}.p: the category fallback must have p = 1, got {p}")
        transitions = require_mapping(spec.get("transitions"), f"{field}.transitions")
        n = len(vocab.categories)
        table = np.zeros((n, n))
        for source, row in transitions.items():
            where = f"{field}.transitions.{source}"
            table[vocab.category_id(source, where)] = distribution(row, where, vocab.category_id, n)
        missing = [c for c, row in zip(vocab.categories, table) if row.sum() == 0]
        if missing:
            raise SpecError(f"{field}.transitions: no row for category {missing[0]!r}")
        return cls(name, p, vocab, table)

    def fire(self, state, tokens, t):
        current, xp = tokens[:, t], arrays_of(tokens)
        return Firing(
            fires=xp.full(current.shape[0], True, xp.bool),
            rule=self.token_category[current],
            dist=current,
            table=self.rows,
        )

    def rule_supports(self):
        """Category c needs one of its tokens and emits what follows them."""
        out = []
        for c in range(len(self.vocab.categories)):
            members = np.flatnonzero(self.token_category == c)
            out.append(RuleSupport((frozenset(members.tolist()),), support(self.token_table[members])))
        return out

    def minimal_contexts(self):
        """Every token alone; its category is the rule (contexts another rule claims are dropped)."""
        return [MinimalContext(int(c), (s,), (0,)) for s, c in enumerate(self.vocab.token_category)]

    def ground_truth(self):
        return {"category_table": self.category_table, "token_table": self.token_table}
