"""Long-range dependencies: a cue early in the sequence fixes a token much later.

When the current token is the trigger B and the cue A occurred at least ``min_distance`` tokens
earlier (anywhere before that), the next token is C (with probability p; otherwise the next rule
down decides), like a subject fixing the form of a verb many tokens later. Rules are tried in
the order listed; the first whose condition holds fires.

Example (min_distance 6), rule ``alice ... . -> sees``::

    alice  helps  a  new  lake  at  the  beach  .     sees
    ^ A                                         ^ B   long_range(alice...->sees)

"alice" lies 8 tokens before ".", at least 6, so "sees" follows.
"""

from __future__ import annotations

import numpy as np

from devinterp.language.arrays import NUMPY, arrays_of
from devinterp.language.primitive import Firing, Primitive, QKView, triple_supports
from devinterp.language.spec import SpecError, require_int, token_rules

NEVER = 10**9  # "first seen" position of a cue not yet seen


class LongRange(Primitive):
    kind = "long_range"
    extra_keys = {"rules", "min_distance"}

    def __init__(self, name, p, vocab, rules: np.ndarray, min_distance: int):
        names = [f"{vocab.tokens[a]}...{vocab.tokens[b]}->{vocab.tokens[c]}" for a, b, c in rules.tolist()]
        super().__init__(name, p, vocab, rule_names=names)
        self.rules = rules  # (n_rules, 3): cue, trigger, output token ids
        self.min_distance = min_distance
        self.cues = np.unique(rules[:, 0])
        self.cue_slot = np.searchsorted(self.cues, rules[:, 0])

    @classmethod
    def parse(cls, spec, vocab, field, name, p):
        min_distance = require_int(spec.get("min_distance"), f"{field}.min_distance", minimum=1)
        rules = token_rules(spec.get("rules"), ("cue", "trigger", "output"), f"{field}.rules", vocab)
        return cls(name, p, vocab, rules, min_distance)

    def check_sequence_length(self, seq_len, field):
        if self.min_distance >= seq_len:
            raise SpecError(
                f"{field}.min_distance: {self.min_distance} must be below the sequence length {seq_len}"
            )

    def begin(self, n, xp=NUMPY):
        return xp.full((n, len(self.cues)), NEVER)  # first position of each cue

    def fire(self, first_seen, tokens, t):
        current = tokens[:, t]
        is_cue = current[:, None] == self.cues[None, :]
        first_seen[:] = arrays_of(tokens).where(is_cue & (first_seen == NEVER), t, first_seen)
        far_enough = (t - first_seen[:, self.cue_slot]) >= self.min_distance  # (n, n_rules)
        holds = far_enough & (current[:, None] == self.rules[None, :, 1])
        fires = holds.any(axis=1)
        rule = arrays_of(tokens).where(fires, arrays_of(tokens).first_true(holds), -1)
        return Firing(fires=fires, rule=rule, dist=self.rules[rule.clip(min=0), 2])

    def rule_supports(self):
        return triple_supports(self.rules)

    def minimal_contexts(self):
        """None: whether a rule fires depends on the distance from A to B, which the
        weight-derived contexts (visible tokens with empty positions between) do not carry into
        the true distribution they are scored against. Long-range rules are measured on the
        probe set (per-primitive and per-rule excess loss)."""
        return []

    def qk_view(self):
        """Trigger (query) against cue (key), at least ``min_distance`` back."""
        return QKView(
            tuple(sorted(set(self.rules[:, 1].tolist()))),
            tuple(sorted(set(self.rules[:, 0].tolist()))),
            self.min_distance,
            None,
            "trigger",
            "cue",
        )

    def ground_truth(self):
        return {"rules": self.rules, "min_distance": np.array(self.min_distance)}
