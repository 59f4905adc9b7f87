"""Reading and validating a language spec (YAML) into plain, checked pieces.

A spec names token categories, the category distribution of the first position, and a list of
primitives in priority order (first listed = highest priority). Every problem raises one
``SpecError`` whose message names the file and the field, e.g.
``seed.yaml: primitives[2].table.alice: probabilities sum to 0.9, not 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

PROBABILITY_TOLERANCE = 1e-6


class SpecError(ValueError):
    """A language spec is malformed; the message names the file and field."""


@dataclass(frozen=True)
class Vocab:
    """Tokens grouped into categories. Token ids follow the order categories list them."""

    tokens: tuple[str, ...]
    categories: tuple[str, ...]
    token_category: np.ndarray  # (V,) int: category index of each token
    within_category: np.ndarray  # (V,) float: p(token | its category)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def token_id(self, token: Any, field: str) -> int:
        try:
            return self.tokens.index(token)
        except ValueError:
            raise SpecError(f"{field}: unknown token {token!r}") from None

    def category_id(self, category: Any, field: str) -> int:
        try:
            return self.categories.index(category)
        except ValueError:
            raise SpecError(
                f"{field}: unknown category {category!r} (categories: {', '.join(self.categories)})"
            ) from None

    def token_ids(self, names: Any, field: str) -> list[int]:
        """Token ids for a list mixing token names and category names (a category means all its tokens)."""
        if not isinstance(names, list) or not names:
            raise SpecError(f"{field}: expected a non-empty list of tokens or categories")
        ids: list[int] = []
        for i, name in enumerate(names):
            if name in self.categories:
                ids.extend(np.flatnonzero(self.token_category == self.categories.index(name)).tolist())
            else:
                ids.append(self.token_id(name, f"{field}[{i}]"))
        return sorted(set(ids))

    def category_mixture(self, category_probs: np.ndarray) -> np.ndarray:
        """(..., n_categories) category distribution -> (..., V) token distribution."""
        return category_probs[..., self.token_category] * self.within_category


def require_mapping(value: Any, field: str) -> Mapping:
    if not isinstance(value, Mapping) or not value:
        raise SpecError(f"{field}: expected a non-empty mapping")
    return value


def require_probability(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{field}: expected a number, got {value!r}")
    if value < 0:
        raise SpecError(f"{field}: negative probability {value}")
    if value > 1:
        raise SpecError(f"{field}: probability {value} is above 1")
    return float(value)


def require_int(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{field}: expected an integer, got {value!r}")
    if value < minimum:
        raise SpecError(f"{field}: must be at least {minimum}, got {value}")
    return value


def distribution(mapping: Any, field: str, index: callable, size: int) -> np.ndarray:
    """A {name: probability} mapping -> dense vector; checks non-negative and summing to 1."""
    mapping = require_mapping(mapping, field)
    probs = np.zeros(size)
    for name, value in mapping.items():
        probs[index(name, f"{field}.{name}")] += require_probability(value, f"{field}.{name}")
    total = probs.sum()
    if abs(total - 1.0) > PROBABILITY_TOLERANCE:
        raise SpecError(f"{field}: probabilities sum to {total:.6g}, not 1")
    return probs


def token_table(rows: Any, field: str, vocab: "Vocab") -> tuple[np.ndarray, list[int]]:
    """A {source token: {next token: probability}} mapping -> (V, V) table (rows of tokens not
    listed are zero) and the source ids in the order listed."""
    table = np.zeros((vocab.size, vocab.size))
    sources = []
    for source, row in require_mapping(rows, field).items():
        s = vocab.token_id(source, f"{field}.{source}")
        table[s] = distribution(row, f"{field}.{source}", vocab.token_id, vocab.size)
        sources.append(s)
    return table, sources


def token_rules(rules: Any, keys: tuple[str, ...], field: str, vocab: "Vocab") -> np.ndarray:
    """A non-empty list of {key: token} mappings (e.g. anchor, trigger, output) -> (n_rules,
    len(keys)) token ids."""
    wanted = ", ".join(keys)
    if not isinstance(rules, list) or not rules:
        raise SpecError(f"{field}: expected a non-empty list of {{{wanted}}}")
    ids = []
    for i, rule in enumerate(rules):
        where = f"{field}[{i}]"
        if not isinstance(rule, dict):
            raise SpecError(f"{where}: expected a mapping with {wanted}")
        check_keys(rule, set(keys), where)
        ids.append([vocab.token_id(rule.get(k), f"{where}.{k}") for k in keys])
    return np.array(ids)


def check_keys(mapping: Mapping, allowed: set[str], field: str) -> None:
    unknown = sorted(set(map(str, mapping)) - allowed)
    if unknown:
        raise SpecError(f"{field}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def parse_vocab(categories: Any, field: str = "categories") -> Vocab:
    categories = require_mapping(categories, field)
    tokens: list[str] = []
    token_category: list[int] = []
    within: list[float] = []
    for c, (category, members) in enumerate(categories.items()):
        where = f"{field}.{category}"
        if isinstance(members, Mapping):
            names, weights = list(members), [members[m] for m in members]
        elif isinstance(members, list):
            names, weights = members, [1.0] * len(members)
        else:
            raise SpecError(f"{where}: expected a list of tokens or a {{token: weight}} mapping")
        if not names:
            raise SpecError(f"{where}: empty category")
        for name, weight in zip(names, weights):
            if not isinstance(name, str) or not name:
                raise SpecError(f"{where}: token names must be non-empty strings, got {name!r}")
            if name in tokens:
                raise SpecError(f"{where}: duplicate token {name!r}")
            if name in categories:
                raise SpecError(f"{where}: token {name!r} has the name of a category")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise SpecError(f"{where}.{name}: weight must be a positive number, got {weight!r}")
            tokens.append(name)
            token_category.append(c)
        total = float(sum(weights))
        within.extend(w / total for w in weights)
    return Vocab(
        tokens=tuple(tokens),
        categories=tuple(str(c) for c in categories),
        token_category=np.array(token_category),
        within_category=np.array(within),
    )


def read_yaml(path: str | Path) -> dict:
    """Safe-load a YAML mapping; a missing or unparsable file is a SpecError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"{path}: cannot read language spec ({error.strerror or error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping with categories, start and primitives")
    return data
