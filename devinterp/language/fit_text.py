"""``devinterp language fit-text FILE``: a language spec estimated from a text.

The text is split on whitespace. The ``vocab_size`` most frequent tokens are kept and every
other token becomes ``<unk>``. With no categories to go on, all tokens form one category whose
within-category weights are the tokens' frequencies, so the category fallback emits the unigram
distribution; every token seen followed by another gets a bigram row with the counted next-token
frequencies (a token's last occurrence in the text has no successor). The first token of the
text's lines gives the start distribution only through the single category. The spec written
loads like any other (``devinterp language show``, ``--data.language``).

Example: the text ``the cat sat . the dog sat .`` gives the bigram rows
``the: {cat: .5, dog: .5}``, ``cat: {sat: 1}``, ``sat: {.: 1}``, ``.: {the: 1}``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from devinterp.errors import UsageError

UNKNOWN = "<unk>"


def fit_text(tokens: list[str], vocab_size: int, name: str = "text") -> dict:
    """A spec (as a mapping) from a token sequence."""
    if vocab_size < 1:
        raise UsageError(f"--vocab: must be at least 1, got {vocab_size}")
    if len(tokens) < 2:
        raise UsageError("the text has fewer than 2 tokens: nothing to estimate")
    counts = Counter(tokens)
    kept = [t for t, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:vocab_size]]
    known = set(kept)
    mapped = [t if t in known else UNKNOWN for t in tokens]
    unigram = Counter(mapped)
    vocabulary = kept + ([UNKNOWN] if UNKNOWN in unigram and UNKNOWN not in known else [])
    category = "TOKEN"
    while category in unigram:
        category += "_"
    successors: dict[str, Counter] = {}
    for current, following in zip(mapped, mapped[1:]):
        successors.setdefault(current, Counter())[following] += 1
    table = {}
    for source in vocabulary:
        if source in successors:
            total = sum(successors[source].values())
            table[source] = {t: n / total for t, n in sorted(successors[source].items(), key=lambda i: -i[1])}
    return {
        "name": name,
        "categories": {category: {t: unigram[t] for t in vocabulary}},
        "start": {category: 1.0},
        "primitives": [
            {"type": "bigram", "name": "bigram", "p": 1.0, "table": table},
            {"type": "category", "name": "category", "transitions": {category: {category: 1.0}}},
        ],
    }


def fit_text_file(path: Path, out: Path, vocab_size: int) -> Path:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        raise UsageError(f"{path}: cannot read the text ({error.strerror or error})") from None
    spec = fit_text(text.split(), vocab_size, name=path.stem)
    if out.exists():
        raise UsageError(f"{out}: exists; choose another --out (a spec is never overwritten)")
    header = (
        f"# Estimated from {path} by `devinterp language fit-text` ({len(text.split())} tokens, "
        f"the {vocab_size} most frequent kept, the rest {UNKNOWN}).\n"
    )
    out.write_text(header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=120))
    return out
