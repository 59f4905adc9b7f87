"""Primitive-specific baselines: what "nothing learned" means for each metric.

A primitive X is learned only as far as the model beats every prediction that cannot read what
X needs. Three yardsticks, each a per-metric value of the metric's mean KL(true || baseline):

- ``blind`` (the default): the best convex pool of the knocked-out language (``Language.
  knock_out``), the context-limited oracles of the full language that X's type admits
  (``Primitive.blind_orders``; devinterp/language/oracles.py) and uniform. Knocking X out also
  removes the bigram-level marginal X leaves behind, which a model with no attention learns
  through its direct path W_E W_U (measured: every head clamped to zero scored 0.6
  skip-trigram progress against the knock-out alone); the order-1 oracle holds that marginal.
- ``knock_out``: the best mix of the knocked-out language and uniform (the pool without oracles).
- ``uniform``: the uniform prediction (what the zero-initialised unembedding gives).

Mean KL is convex in the pool's weights, so the weights are fitted on the simplex to the global
optimum, certified by the duality gap (``best_pool``). The pool always contains uniform, so it is
finite. Progress = 1 - KL(true || model) / baseline: a model predicting any pooled component
scores at most 0, the truth 1. Where the blind baseline is at most ``UNMEASURABLE`` of the
uniform one, X's information is (nearly) all in what a blind model can read: X is unmeasurable
on that metric and its blind progress is NaN, never a ratio of two small numbers.

The category fallback has no knock-out (every position needs it): its pool is its oracles and
uniform. A corpus has no exact distributions: its metrics keep the uniform baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devinterp.language import plogp
from devinterp.language.oracles import ContextOracles

UNMEASURABLE = 0.2  # blind KL at most this share of the uniform KL: the primitive is unmeasurable


def best_pool(
    target: np.ndarray,
    components: dict[str, np.ndarray],
    weights: np.ndarray | None = None,
    uniform: np.ndarray | None = None,
    iterations: int = 5000,
    tolerance: float = 1e-10,
) -> tuple[float, dict[str, float]]:
    """(smallest weighted mean KL(target || pool), the pool's weights by component name) over
    pools sum_k pi_k components[k] + pi_u uniform, pi on the simplex; target and every
    component (n, V), rows weighted by ``weights`` (n,); ``uniform`` (V,) the uniform prediction
    in these coordinates (default 1 / V; over categories, the token-uniform one summed within
    each). The objective is convex in pi, so a point is its global minimum when the duality gap
    max_k r_k - 1 is 0, with r = P (mass / q) the gradient's EM multipliers (the KL is within the
    gap of the minimum). Solved by SLSQP on the simplex (a few dozen steps), then EM steps until
    the gap is at most ``tolerance`` nats: EM alone crawls where components are nearly alike
    (5000 steps left a gap of 1e-5 and weights still moving on a Markov chain's pool). Where
    components coincide on the target's support the weights are not unique: any pool returned
    reaches the minimum."""
    n, V = target.shape if target.ndim == 2 else (0, 0)
    if not n:
        return float("nan"), {}
    names = [*components, "uniform"]
    weights = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    rows, cols = np.nonzero((target > 0) & (weights[:, None] > 0))
    mass = weights[rows] * target[rows, cols]  # (nnz,)
    mass = mass / mass.sum()
    uniform = np.full(V, 1.0 / V) if uniform is None else np.asarray(uniform, dtype=np.float64)
    P = np.stack([components[name][rows, cols] for name in components] + [uniform[cols]])  # (K, nnz)
    target_plogp = float((weights * plogp(target)).sum() / weights.sum())  # minus the mean entropy
    pi = _simplex_start(P, mass)
    for _ in range(iterations):
        multipliers = P @ (mass / (pi @ P))  # (K,) sum_k pi_k multipliers_k = 1
        if multipliers.max() - 1 <= tolerance:
            break
        pi = pi * multipliers
        pi /= pi.sum()
    q = pi @ P
    # the weighted mean over rows of sum_v t log t - sum_v t log q, rows weighted by ``weights``
    cross = float((weights[rows] * target[rows, cols] * np.log(q)).sum() / weights.sum())
    return max(target_plogp - cross, 0.0), dict(zip(names, pi.tolist()))


def _simplex_start(P: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """SLSQP's minimum of -mass . log(pi P) on the simplex, kept inside it with every weight
    positive (EM cannot move a weight off 0); the uniform pool where SLSQP does no better."""
    from scipy.optimize import minimize

    K = len(P)
    start = np.full(K, 1.0 / K)

    def objective(pi):
        return -float(mass @ np.log(np.maximum(pi @ P, 1e-300)))

    def gradient(pi):
        return -(P @ (mass / np.maximum(pi @ P, 1e-300)))

    found = minimize(
        objective,
        start,
        jac=gradient,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * K,
        constraints=[{"type": "eq", "fun": lambda pi: pi.sum() - 1, "jac": lambda pi: np.ones(K)}],
        options={"ftol": 1e-15, "maxiter": 200},
    )
    pi = np.clip(np.nan_to_num(found.x, nan=0.0), 1e-12, None)
    pi /= pi.sum()
    return pi if objective(pi) <= objective(start) else start


def pool_provenance(pool: dict[str, float]) -> str:
    """The pool's components with weight >= 0.005, e.g. ``knock_out 0.41 + order1 0.52``."""
    kept = [f"{name} {share:.2f}" for name, share in pool.items() if share >= 0.005]
    return " + ".join(kept) or "uniform 1.00"


def blind_components(
    language,
    index: int,
    oracles: ContextOracles,
    tokens: np.ndarray,
    filled: np.ndarray | None = None,
    knock_out: bool = True,
) -> dict[str, np.ndarray]:
    """The predictions a model blind to primitive ``index`` (1-based label) may pool, after every
    position of ``tokens`` (n, T): name -> (n, T, V). ``knock_out``: the language without it
    (none for the fallback, the last primitive); ``order<k>``: the oracles its type admits, used
    where the last k slots are ``filled`` (else backed off). ``knock_out`` False: the oracles only."""
    primitive = language.primitives[index - 1]
    found = {}
    if knock_out and index < len(language.primitives):
        found["knock_out"] = language.knock_out([primitive.name]).true_next_dist(tokens)
    for order in primitive.blind_orders:
        found[f"order{order}"] = oracles.predict(tokens, order, filled)
    return found


@dataclass(frozen=True)
class Baselines:
    """One metric's "nothing learned" KL on the two primitive-specific yardsticks (the uniform
    one is ``MetricInfo.nothing``): ``knock_out`` (NaN where there is no knock-out: the fallback
    primitive) and ``blind``, with the blind pool's components (``pool_provenance``)."""

    knock_out: float
    blind: float
    blind_from: str


def pooled_baselines(
    target: np.ndarray,
    components: dict[str, np.ndarray],
    weights: np.ndarray | None = None,
    uniform: np.ndarray | None = None,
) -> Baselines:
    """Both yardsticks of one metric from its rows: target and components (n, V)."""
    knock_out = float("nan")
    if "knock_out" in components:
        knock_out, _ = best_pool(target, {"knock_out": components["knock_out"]}, weights, uniform)
    blind, pool = best_pool(target, components, weights, uniform)
    return Baselines(knock_out, blind, pool_provenance(pool))


def label_components(
    language, oracles: ContextOracles, tokens: np.ndarray, labels: np.ndarray
) -> dict[int, dict[str, np.ndarray]]:
    """Every primitive's blind components (``blind_components``) at its own positions: label
    index -> name -> (positions, V), for tokens (n, T) and the labels (n, T-1) of the next token;
    primitives without a position are left out."""
    found = {}
    for index in range(1, len(language.primitives) + 1):
        where = labels == index
        if where.any():
            found[index] = {
                name: values[:, :-1][where]
                for name, values in blind_components(language, index, oracles, tokens).items()
            }
    return found


def probe_baselines(
    language,
    oracles: ContextOracles,
    tokens: np.ndarray,
    true_next: np.ndarray,
    labels: np.ndarray,
    rules: np.ndarray,
    components_by_label: dict[int, dict[str, np.ndarray]] | None = None,
) -> tuple[dict[int, Baselines], dict[int, Baselines]]:
    """The baselines of every primitive (by label index) and rule (by rule index) on the probe
    set: tokens (n, T), true_next (n, T-1, V) the exact distributions of the next token, labels
    and rules (n, T-1) of the next token; ``components_by_label`` from ``label_components`` when
    the caller has them already."""
    if components_by_label is None:
        components_by_label = label_components(language, oracles, tokens, labels)
    by_label: dict[int, Baselines] = {}
    by_rule: dict[int, Baselines] = {}
    for index, components in components_by_label.items():
        primitive = language.primitives[index - 1]
        where = labels == index
        by_label[index] = pooled_baselines(true_next[where], components)
        for rule_name in primitive.rule_names:
            rule = language.rule_names.index(f"{primitive.name}/{rule_name}")
            mine = rules[where] == rule
            if mine.any():
                by_rule[rule] = pooled_baselines(
                    true_next[where][mine], {name: rows[mine] for name, rows in components.items()}
                )
    return by_label, by_rule
