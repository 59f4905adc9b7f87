"""Which rules can ever fire: a fixpoint over the declared supports, known before training.

A token can occur if the start distribution gives it mass or a rule that can fire may emit it;
a rule can fire if every set of tokens it needs (``Primitive.rule_supports``) has a token that
can occur. Iterating from the start distribution to the fixpoint over-approximates what any
sequence can hold (order, distance, priority and suppression are ignored), so a rule found
impossible is impossible. A primitive none of whose rules can fire is *empty*: it has no
positions to probe and no mechanism to learn, which is not the same as a run that diverged.

The usual way to empty one is a knock-out: removing the only rule that produces another
primitive's trigger (bigram rows that open brackets) leaves that primitive no condition to meet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devinterp.language.language import Language


@dataclass(frozen=True)
class Reachability:
    """The fixpoint's answer for one language."""

    tokens: np.ndarray  # (V,) bool: the token can occur
    rules: np.ndarray  # (n_rules,) bool over Language.rule_names: the rule can fire
    empty: dict[str, str]  # primitive name -> the tokens its condition needs that cannot occur ("'(' or '['")


def reachability(language: Language) -> Reachability:
    """The tokens that can occur and the rules that can fire in ``language`` (cached on it). A
    corpus made elsewhere has no rules: every token can occur, nothing is empty."""
    cached = language.__dict__.get("_reachability")
    if cached is not None:
        return cached
    if not language.primitives:
        return Reachability(np.ones(language.d_vocab, dtype=bool), np.zeros(0, dtype=bool), {})
    supports = [(p, r, s) for p in language.primitives for r, s in enumerate(p.rule_supports())]
    can_occur = language.start_dist > 0  # (V,)
    can_fire = np.zeros(len(supports), dtype=bool)
    changed = True
    while changed:
        changed = False
        for i, (_, _, rule) in enumerate(supports):
            if can_fire[i] or not all(can_occur[list(need)].any() for need in rule.needs):
                continue
            can_fire[i] = changed = True
            can_occur[list(rule.emits)] = True
    empty = {}
    for primitive in language.primitives:
        rules = [s for (p, _, s), ok in zip(supports, can_fire) if p is primitive and not ok]
        if len(rules) == len(primitive.rule_names):
            empty[primitive.name] = _why(language, rules, can_occur)
    answer = Reachability(tokens=can_occur, rules=can_fire, empty=empty)
    language.__dict__["_reachability"] = answer
    return answer


def _why(language: Language, rules: list, can_occur: np.ndarray) -> str:
    """The needed tokens that cannot occur, named ("'(' or '['"): per rule, its first need
    that nothing produces."""
    missing = sorted(
        {t for rule in rules for t in next(n for n in rule.needs if not can_occur[list(n)].any())}
    )
    names = [repr(language.vocab.tokens[t]) for t in missing]
    return " or ".join(names[:4]) + (" ..." if len(names) > 4 else "")


def empty_text(language: Language) -> list[str]:
    """One line per empty primitive of ``language``: what it needs that nothing produces."""
    where = language.source or language.name
    return [
        f"{name} can never fire: its condition needs {tokens}, which no rule of {where} produces"
        for name, tokens in reachability(language).empty.items()
    ]


def emptied_by_knock_out(full: Language, knocked_out: Language, names: list[str]) -> list[str]:
    """One line per primitive that ``full`` can fire and ``knocked_out`` cannot: what the
    knock-out of ``names`` does to it, said before training."""
    before, after = reachability(full).empty, reachability(knocked_out).empty
    return [
        f"knocking out {', '.join(names)} leaves nothing that produces {tokens}: {name} can never fire "
        "and is left out of this variant's analysis"
        for name, tokens in after.items()
        if name not in before
    ]
