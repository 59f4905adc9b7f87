"""Skip-trigrams: A ... B -> C.

When the current token is the trigger B and the anchor A occurs at offsets 1..max_skip before
it, the next token is C (with probability p; otherwise the next rule down decides). Rules are
tried in the order listed; the first whose condition holds fires.

Example (seed language, max_skip 8), rule ``beach .. big -> at``::

    alice  sees  the  beach  .  bob  finds  a  big  at
    ...                                        ^ B  ^ skip_trigram(beach..big->at)

"beach" lies 5 tokens before "big", inside the window, so "at" follows.
"""

from __future__ import annotations

import numpy as np

from devinterp.language.arrays import NUMPY, arrays_of
from devinterp.language.primitive import (
    Firing,
    MinimalContext,
    Primitive,
    QKView,
    TrigramPush,
    triple_supports,
)
from devinterp.language.spec import SpecError, Vocab, require_int, token_rules

NEVER = -(10**9)  # "last seen" position of an anchor not yet seen


class SkipTrigram(Primitive):
    kind = "skip_trigram"
    extra_keys = {"rules", "max_skip"}
    weigh_contexts_by_occurrence = True  # an offset the language never produces teaches nothing

    def __init__(self, name: str, p: float, vocab: Vocab, rules: np.ndarray, max_skip: int):
        names = [f"{vocab.tokens[a]}..{vocab.tokens[b]}->{vocab.tokens[c]}" for a, b, c in rules.tolist()]
        super().__init__(name, p, vocab, rule_names=names)
        self.rules = rules  # (n_rules, 3): anchor, trigger, output token ids
        self.max_skip = max_skip
        self.anchors = np.unique(rules[:, 0])  # (n_anchors,)
        self.anchor_slot = np.searchsorted(self.anchors, rules[:, 0])  # (n_rules,)

    @classmethod
    def parse(cls, spec, vocab, field, name, p):
        max_skip = require_int(spec.get("max_skip"), f"{field}.max_skip", minimum=1)
        rules = token_rules(spec.get("rules"), ("anchor", "trigger", "output"), f"{field}.rules", vocab)
        return cls(name, p, vocab, rules, max_skip)

    def check_sequence_length(self, seq_len, field):
        if self.max_skip >= seq_len:
            raise SpecError(f"{field}.max_skip: {self.max_skip} must be below the sequence length {seq_len}")

    def begin(self, n, xp=NUMPY):
        return xp.full((n, len(self.anchors)), NEVER)  # last position of each anchor

    def fire(self, last_seen, tokens, t):
        current = tokens[:, t]  # (n,)
        in_window = (t - last_seen[:, self.anchor_slot]) <= self.max_skip  # (n, n_rules)
        holds = in_window & (current[:, None] == self.rules[None, :, 1])
        fires = holds.any(axis=1)
        rule = arrays_of(tokens).where(fires, arrays_of(tokens).first_true(holds), -1)
        # the anchor must lie strictly before t: record token t only after the check
        is_anchor = current[:, None] == self.anchors[None, :]
        last_seen[:] = arrays_of(tokens).where(is_anchor, t, last_seen)
        return Firing(fires=fires, rule=rule, dist=self.rules[rule.clip(min=0), 2])

    def rule_supports(self):
        return triple_supports(self.rules)

    def minimal_contexts(self):
        """A at offset d before B, the positions between empty, for d = 1..max_skip."""
        return [
            MinimalContext(r, (int(a), int(b)), (0, d))
            for r, (a, b, _) in enumerate(self.rules.tolist())
            for d in range(1, self.max_skip + 1)
        ]

    def weight_diagnostics(self):
        return [TrigramPush(self.rules, tuple(range(1, self.max_skip + 1)))]

    def qk_view(self):
        """Trigger (query) against anchor (key), at the offsets the rule allows."""
        return QKView(
            tuple(sorted(set(self.rules[:, 1].tolist()))),
            tuple(sorted(set(self.rules[:, 0].tolist()))),
            1,
            self.max_skip,
            "trigger",
            "anchor",
        )

    def ground_truth(self):
        return {"rules": self.rules, "max_skip": np.array(self.max_skip)}
