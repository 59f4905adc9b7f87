"""A deliberately simple, per-sequence reference of the DGP, sharing no code with the sampler.

It reads the raw spec mapping (as YAML gives it) and, for one sequence of token strings, works
out each position's next-token distribution with plain Python loops and dicts, following
the conventions of devinterp/language/language.py literally.
"""

from __future__ import annotations


def vocabulary(spec: dict) -> tuple[list[str], dict[str, str], dict[str, float]]:
    tokens, category_of, within = [], {}, {}
    for category, members in spec["categories"].items():
        weights = dict(members) if isinstance(members, dict) else {m: 1.0 for m in members}
        total = sum(weights.values())
        for token, weight in weights.items():
            tokens.append(token)
            category_of[token] = category
            within[token] = weight / total
    return tokens, category_of, within


def eligible_tokens(names: list[str], category_of: dict[str, str]) -> set[str]:
    out = set()
    for name in names:
        out |= {t for t, c in category_of.items() if c == name} if name in category_of.values() else {name}
    return out


def own_distribution(primitive: dict, seq: list[str], t: int, category_of, within):
    """The primitive's own distribution at position t, or None if its condition does not hold."""
    current = seq[t]
    kind = primitive["type"]
    if kind == "category":
        row = primitive["transitions"][category_of[current]]
        return {tok: row.get(category_of[tok], 0.0) * within[tok] for tok in category_of}
    if kind == "bigram":
        return dict(primitive["table"][current]) if current in primitive["table"] else None
    if kind == "skip_trigram":
        window = seq[max(0, t - primitive["max_skip"]) : t]
        for rule in primitive["rules"]:
            if current == rule["trigger"] and rule["anchor"] in window:
                return {rule["output"]: 1.0}
        return None
    if kind == "token_trigram":
        for rule in primitive["rules"]:
            if t >= 1 and seq[t - 1] == rule["first"] and current == rule["second"]:
                return {rule["output"]: 1.0}
        return None
    if kind == "long_range":
        early = seq[: max(0, t - primitive["min_distance"] + 1)]  # at least min_distance before t
        for rule in primitive["rules"]:
            if current == rule["trigger"] and rule["cue"] in early:
                return {rule["output"]: 1.0}
        return None
    if kind == "topic":
        seen = [tok for tok in seq[: t + 1] if tok in primitive["topics"]]
        if seen and current in primitive["topics"][seen[-1]]:
            return dict(primitive["topics"][seen[-1]][current])
        return None
    if kind == "quote":
        inside = False
        for tok in seq[: t + 1]:
            if inside and tok == primitive["close"]:
                inside = False
            elif tok == primitive["open"]:
                inside = True
        if not inside:
            return None
        row = dict(primitive.get("table", {}).get(current, primitive["content"]))
        out = {tok: (1 - primitive["p_close"]) * q for tok, q in row.items()}
        out[primitive["close"]] = out.get(primitive["close"], 0.0) + primitive["p_close"]
        return out
    if kind == "brackets":
        opens = [o for o, _ in primitive["pairs"]]
        close_of = dict(primitive["pairs"])
        stack: list[str] = []
        for tok in seq[: t + 1]:
            if stack and tok == close_of[stack[-1]]:
                stack.pop()
            elif tok in opens and len(stack) < primitive["max_depth"]:
                stack.append(tok)
        if not stack:
            return None
        p_close = primitive["p_close"]
        p_open = primitive.get("p_open", 0.0) if len(stack) < primitive["max_depth"] else 0.0
        row = primitive.get("table", {}).get(current, primitive["content"])
        out = {tok: (1 - p_close - p_open) * q for tok, q in row.items()}
        out[close_of[stack[-1]]] = out.get(close_of[stack[-1]], 0.0) + p_close
        for o in opens:
            out[o] = out.get(o, 0.0) + p_open / len(opens)
        return out
    if kind == "induction":
        if current not in eligible_tokens(primitive["eligible"], category_of):
            return None
        for j in range(t - 1, -1, -1):
            if seq[j] == current:
                return {seq[j + 1]: 1.0}
        return None
    raise ValueError(kind)


def switched_off(spec: dict, seq: list[str], t: int, category_of, within) -> set[str]:
    """Names of the primitives some firing primitive suppresses at position t."""
    off = set()
    for primitive in spec["primitives"]:
        if (
            primitive.get("suppresses")
            and own_distribution(primitive, seq, t, category_of, within) is not None
        ):
            off |= set(primitive["suppresses"])
    return off


def holds(primitive: dict, seq, t, category_of, within, off: set[str]):
    if primitive.get("name", primitive["type"]) in off:
        return None
    return own_distribution(primitive, seq, t, category_of, within)


def reference_next_dist(spec: dict, seq: list[str]) -> list[list[float]]:
    """For each position t, the distribution of token t + 1 given seq[:t + 1], in vocab order."""
    tokens, category_of, within = vocabulary(spec)
    out = []
    for t in range(len(seq)):
        off = switched_off(spec, seq, t, category_of, within)
        # the lowest rule that holds is the start; each higher rule that holds mixes over it
        mixed: dict[str, float] = {}
        for primitive in reversed(spec["primitives"]):
            own = holds(primitive, seq, t, category_of, within, off)
            if own is None:
                continue
            p = primitive.get("p", 1.0)
            mixed = {tok: p * own.get(tok, 0.0) + (1 - p) * mixed.get(tok, 0.0) for tok in tokens}
        out.append([mixed[tok] for tok in tokens])
    return out


def reference_label(spec: dict, seq: list[str], t: int) -> str:
    """Name of the first primitive in priority order whose condition holds at position t."""
    _, category_of, within = vocabulary(spec)
    off = switched_off(spec, seq, t, category_of, within)
    for primitive in spec["primitives"]:
        if holds(primitive, seq, t, category_of, within, off) is not None:
            return primitive.get("name", primitive["type"])
    raise AssertionError("the category fallback always holds")
