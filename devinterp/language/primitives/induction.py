"""Induction: an eligible token seen before is followed by what followed it last time.

When the current token x is eligible and occurred earlier, at most recently position j, the
next token is tokens[j + 1] (with probability p). A first occurrence falls through to the next
rule down (in the seed language, the name's bigram table).

Example (seed language, names eligible)::

    alice  sees  the  lake  .  bob  helps  alice  sees
                                           ^ x    ^ induction(copy)

"alice" was last followed by "sees", so "sees" follows again.
"""

from __future__ import annotations

import numpy as np

from devinterp.language.arrays import NUMPY, arrays_of
from devinterp.language.primitive import Firing, InductionCircuit, MinimalContext, Primitive, RuleSupport
from devinterp.language.spec import Vocab


class Induction(Primitive):
    kind = "induction"
    extra_keys = {"eligible"}
    possible_contexts_only = True  # copy y only where the language can put y after x

    def __init__(self, name: str, p: float, vocab: Vocab, eligible: list[int]):
        super().__init__(name, p, vocab, rule_names=["copy"])
        self.eligible = np.zeros(vocab.size, dtype=bool)  # (V,)
        self.eligible[eligible] = True

    @classmethod
    def parse(cls, spec, vocab, field, name, p):
        return cls(name, p, vocab, vocab.token_ids(spec.get("eligible"), f"{field}.eligible"))

    def begin(self, n, xp=NUMPY):
        return xp.full((n, self.vocab.size), -1)  # follower[v]: token after v's latest occurrence

    def fire(self, follower, tokens, t):
        xp = arrays_of(tokens)
        rows = xp.arange(tokens.shape[0])
        current = tokens[:, t]
        if t > 0:
            follower[rows, tokens[:, t - 1]] = current
        copied = follower[rows, current]
        fires = self.eligible[current] & (copied >= 0)
        return Firing(fires=fires, rule=xp.where(fires, 0, -1), dist=copied.clip(min=0))

    def rule_supports(self):
        """Copying needs an eligible token and emits only tokens already in the context."""
        return [RuleSupport((frozenset(np.flatnonzero(self.eligible).tolist()),), frozenset())]

    def minimal_contexts(self):
        """[x, y, x] for every eligible x and token y (the prediction should be y); the metric
        keeps the pairs the language can produce (``possible_contexts_only``)."""
        return [
            MinimalContext(0, (int(x), y, int(x)), (0, 1, 2))
            for x in np.flatnonzero(self.eligible)
            for y in range(self.vocab.size)
        ]

    def weight_diagnostics(self):
        return [InductionCircuit()]

    def ground_truth(self):
        return {"eligible": np.flatnonzero(self.eligible)}
