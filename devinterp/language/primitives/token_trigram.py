"""Token trigrams: (A, B) -> C.

When the previous token is A and the current token is B, the next token is C (with probability
p; otherwise the next rule down decides). Rules are tried in the order listed; the first whose
condition holds fires. A token trigram is a skip-trigram whose anchor must sit right before the
trigger, which a transformer can implement with previous-token attention in one layer.

Example, rule ``the big -> beach``::

    alice  sees  the  big  beach
                 ^ A  ^ B  token_trigram(the,big->beach)

"beach" is labelled ``token_trigram`` because "the" came right before "big"; after "a big" the
rule does not fire and the rules below decide.
"""

from __future__ import annotations

import numpy as np

from devinterp.language.arrays import arrays_of
from devinterp.language.primitive import Firing, MinimalContext, Primitive, QKView, triple_supports
from devinterp.language.spec import token_rules


class TokenTrigram(Primitive):
    kind = "token_trigram"
    blind_orders = (0, 1)  # it reads the previous and the current token
    extra_keys = {"rules"}

    def __init__(self, name, p, vocab, rules: np.ndarray):
        names = [f"{vocab.tokens[a]},{vocab.tokens[b]}->{vocab.tokens[c]}" for a, b, c in rules.tolist()]
        super().__init__(name, p, vocab, rule_names=names)
        self.rules = rules  # (n_rules, 3): first, second, output token ids

    @classmethod
    def parse(cls, spec, vocab, field, name, p):
        return cls(
            name,
            p,
            vocab,
            token_rules(spec.get("rules"), ("first", "second", "output"), f"{field}.rules", vocab),
        )

    def fire(self, state, tokens, t):
        n, xp = tokens.shape[0], arrays_of(tokens)
        if t == 0:
            return Firing(fires=xp.zeros(n, xp.bool), rule=xp.full(n, -1), dist=xp.zeros(n, xp.int64))
        holds = (tokens[:, t - 1, None] == self.rules[None, :, 0]) & (
            tokens[:, t, None] == self.rules[None, :, 1]
        )
        fires = holds.any(axis=1)
        rule = xp.where(fires, xp.first_true(holds), -1)
        return Firing(fires=fires, rule=rule, dist=self.rules[rule.clip(min=0), 2])

    def rule_supports(self):
        return triple_supports(self.rules)

    def minimal_contexts(self):
        """A then B at adjacent positions."""
        return [
            MinimalContext(r, (int(a), int(b)), (0, 1)) for r, (a, b, _) in enumerate(self.rules.tolist())
        ]

    def qk_view(self):
        """Second token (query) against first token (key), one position back."""
        return QKView(
            tuple(sorted(set(self.rules[:, 1].tolist()))),
            tuple(sorted(set(self.rules[:, 0].tolist()))),
            1,
            1,
            "second",
            "first",
        )

    def ground_truth(self):
        return {"rules": self.rules}
