"""Primitive-specific baselines: the best prediction available without the primitive.

Progress against the uniform prediction counts learning a primitive's fallback (the rule below
it) as learning the primitive. The baseline here is instead the smallest mean

    KL(true || (1 - a) p_ko + a uniform),   a in [0, 1],

over a metric's contexts or positions, where p_ko is the exact next-token distribution of the
language with the primitive knocked out (``Language.knock_out``). One convex parameter: always
finite (a knock-out that gives the true token zero mass is rescued by the uniform share) and no
worse than the uniform prediction (a = 1) or the knock-out alone (a = 0). Progress = 1 - KL(true
|| model) / baseline: a model predicting the knock-out scores at most 0, the truth 1.

The category fallback has no knock-out (every position needs it) and a corpus has no exact
distributions: their metrics keep the uniform baseline (``MetricInfo.fallback_from``).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from devinterp.language import plogp


def mixture_kl(
    target: np.ndarray, knocked_out: np.ndarray, share: float, weights: np.ndarray | None = None
) -> float:
    """Mean over rows (weighted by ``weights``) of KL(target || (1 - share) knocked_out + share
    uniform); target, knocked_out (n, V). Infinite where the mixture misses a true token."""
    V = target.shape[-1]
    mixture = (1 - share) * knocked_out + share / V
    log_mixture = np.log(np.where(mixture > 0, mixture, 1.0))
    missed = ((target > 0) & (mixture <= 0)).any(-1)
    kl = np.where(missed, np.inf, plogp(target) - (target * log_mixture).sum(-1))
    weights = np.ones(len(kl)) if weights is None else np.asarray(weights, dtype=np.float64)
    used = weights > 0
    if np.isinf(kl[used]).any():
        return float("inf")
    return float(np.sum(weights[used] * kl[used]) / np.sum(weights[used]))


def best_mixture(
    target: np.ndarray, knocked_out: np.ndarray, weights: np.ndarray | None = None
) -> tuple[float, float]:
    """(smallest mean KL, its uniform share a) over a in [0, 1]; target, knocked_out (n, V),
    rows weighted by ``weights`` (n,) if given."""
    if not len(target):
        return float("nan"), float("nan")
    ends = [(mixture_kl(target, knocked_out, a, weights), a) for a in (0.0, 1.0)]
    inner = minimize_scalar(
        lambda a: mixture_kl(target, knocked_out, a, weights),
        bounds=(1e-9, 1.0),
        method="bounded",
        options={"xatol": 1e-7},
    )
    candidates = ends + ([(float(inner.fun), float(inner.x))] if np.isfinite(inner.fun) else [])
    return min(candidates)


def probe_fallbacks(
    language, tokens: np.ndarray, true_next: np.ndarray, labels: np.ndarray, rules: np.ndarray
) -> tuple[dict[int, float], dict[int, float]]:
    """The best-mixture baseline of every primitive (by label index) and rule (by rule index)
    on the probe set: tokens (n, T), true_next (n, T-1, V) the exact distributions of the next
    token, labels and rules (n, T-1) of the next token. The last primitive (the fallback every
    position needs) has none."""
    by_label: dict[int, float] = {}
    by_rule: dict[int, float] = {}
    for index, primitive in enumerate(language.primitives[:-1], start=1):
        where = labels == index
        if not where.any():
            continue
        without = language.knock_out([primitive.name]).true_next_dist(tokens)[:, :-1]  # (n, T-1, V)
        by_label[index], _ = best_mixture(true_next[where], without[where])
        for rule_name in primitive.rule_names:
            rule = language.rule_names.index(f"{primitive.name}/{rule_name}")
            mine = rules == rule
            if mine.any():
                by_rule[rule], _ = best_mixture(true_next[mine], without[mine])
    return by_label, by_rule
