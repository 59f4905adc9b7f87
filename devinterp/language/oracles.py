"""Context-limited oracles: the best prediction of a model that reads only the last k tokens.

The order-k oracle of a language is p(next | the last k tokens) of the *full* language: order 0
the unigram distribution of next tokens, order 1 p(next | current token), order 2
p(next | previous, current token). No model without attention can beat the order-1 oracle (a
direct path W_E W_U, or an MLP on the current token, sees the current token alone), which is what
makes it a yardstick: a primitive X is learned only as far as the model beats every predictor
that cannot read what X needs (devinterp/baselines.py).

Estimated without sampling noise in the targets: the exact next-token distributions
(``Language.true_next_dist``) are averaged over the positions of ``n_sequences`` training-
distribution sequences of the run's length, grouped by their last k tokens (E[p(next | context) |
last k tokens] = p(next | last k tokens)). A row seen n times is shrunk toward the row of the next
lower order with the weight of ``prior_count`` positions, (sum + c p_{k-1}) / (n + c): a context
seen rarely (or never) backs off smoothly, and two samples' oracles differ less where data are
thin. Each order keeps its counts and the standard error of its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

ORACLE_SEED = 104_729  # not a training, probe or LLC pool seed: an independent sample
ORDERS = (0, 1, 2)


@dataclass(frozen=True)
class ContextOracles:
    """The order-0, -1 and -2 oracles of one language at one sequence length.

    ``tables[k]`` (V^k rows, V): row r is p(next | last k tokens = r in base V, the current token
    the lowest digit); ``counts[k]`` (V^k,): positions seen with that context; ``std_error[k]``:
    the occurrence-weighted mean, over contexts, of the Euclidean norm of their rows' standard
    errors. ``rule_positions`` (n_rules,): how many positions of the sample each rule took (the
    training distribution's rule frequencies, which weigh rules against each other).
    """

    tables: tuple[np.ndarray, ...]
    counts: tuple[np.ndarray, ...]
    std_error: tuple[float, ...]
    n_sequences: int
    seq_len: int
    seed: int
    prior_count: int
    rule_positions: np.ndarray

    @property
    def d_vocab(self) -> int:
        return self.tables[0].shape[-1]

    def predict(self, tokens: np.ndarray, order: int, filled: np.ndarray | None = None) -> np.ndarray:
        """(n, T) tokens -> (n, T, V): entry t is the order-``order`` prediction of token t + 1
        from tokens <= t. An order k is used only where the last k slots are filled (``filled``
        (n, T) bool, default all); else the largest lower order whose slots are (so [A, empty, ...,
        B] gets order 1, and position 0 order <= 1)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n, T = tokens.shape
        filled = np.ones((n, T), dtype=bool) if filled is None else np.asarray(filled, dtype=bool)
        V = self.d_vocab
        out = np.broadcast_to(self.tables[0][0], (n, T, V)).copy()
        key = np.zeros((n, T), dtype=np.int64)  # the last k tokens in base V
        reach = np.ones((n, T), dtype=bool)  # the last k slots are all filled
        for k in range(1, order + 1):
            shifted = np.zeros((n, T), dtype=np.int64)
            shifted_filled = np.zeros((n, T), dtype=bool)
            shifted[:, k - 1 :] = tokens[:, : T - k + 1]
            shifted_filled[:, k - 1 :] = filled[:, : T - k + 1]
            key = key + shifted * V ** (k - 1)  # the token k - 1 back is digit k - 1
            reach &= shifted_filled
            out[reach] = self.tables[k][key[reach]]
        return out


def estimate_oracles(
    language, seq_len: int, n_sequences: int = 4096, seed: int = ORACLE_SEED, prior_count: int = 20
) -> ContextOracles:
    """The oracles of ``language`` from ``n_sequences`` sequences of ``seq_len`` tokens drawn
    with ``seed`` (see the module docstring)."""
    sample = language.sample(n_sequences, seq_len, seed)
    tokens = sample.tokens[:, :-1]  # (n, T-1): the tokens predictions are made after
    dist = language.true_next_dist(sample.tokens)[:, :-1]  # (n, T-1, V): p(token t+1 | tokens <= t)
    V = dist.shape[-1]
    tables, counts, errors = [], [], []
    key = np.zeros(tokens.shape, dtype=np.int64)
    valid = np.ones(tokens.shape, dtype=bool)
    for k in ORDERS:
        if k > 0:
            shifted = np.zeros(tokens.shape, dtype=np.int64)
            shifted[:, k - 1 :] = tokens[:, : tokens.shape[1] - k + 1]
            key = key + shifted * V ** (k - 1)
            valid[:, : k - 1] = False  # fewer than k tokens seen
        rows, weights = key[valid], dist[valid]  # (m,), (m, V)
        count = np.bincount(rows, minlength=V**k).astype(np.float64)
        by_context = sparse.csr_matrix(
            (np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(V**k, len(rows))
        )
        total, square = by_context @ weights, by_context @ weights**2  # (V^k, V) sums over positions
        seen = np.maximum(count, 1)[:, None]
        variance = np.maximum(square / seen - (total / seen) ** 2, 0.0)
        if k == 0:
            mean = total / seen
        else:  # shrunk toward the row of the last k - 1 tokens (key mod V^(k-1))
            parent = tables[-1][np.arange(V**k) % V ** (k - 1)]
            mean = (total + prior_count * parent) / (count + prior_count)[:, None]
        error = np.sqrt(variance.sum(1) / np.maximum(count - 1, 1))  # (V^k,): a row's SE norm
        tables.append(mean)
        counts.append(count.astype(np.int64))
        errors.append(float((error * count).sum() / max(count.sum(), 1)))
    rules = sample.rules[:, 1:]  # the rule of each predicted token
    rule_positions = np.bincount(rules[rules >= 0], minlength=len(language.rule_names))
    return ContextOracles(
        tuple(tables), tuple(counts), tuple(errors), n_sequences, seq_len, seed, prior_count, rule_positions
    )
