"""In-context Markov chains (Edelman et al., NeurIPS 2024, "The Evolution of Statistical Induction
Heads"): each sequence runs its own chain over k state tokens, whose transition matrix was drawn
from a prior and is never shown; only the states are.

No hidden coin flips: the matrix is integrated out. Given the visible tokens, the next state's
exact distribution is the prior's posterior predictive from the transitions the chain made so far
in this sequence, which is how it is sampled too (a Polya urn per context, the same process as
drawing the matrix first):

- ``prior: dirichlet`` (the paper's): every row P[c, .] ~ Dirichlet(alpha) independently, c the last
  ``order - 1`` states. p(x | c) = (count(c -> x) + alpha) / (count(c -> .) + k alpha).
- ``prior: circulant`` (order 2): P[i, j] = w[(j - i) mod k] with w ~ Dirichlet(alpha), a doubly
  stochastic matrix whose stationary distribution is uniform, so in-context unigram statistics
  say nothing about the next state. Conjugate: with d(s) the chain's transitions that moved by s,
  p(x | i) = (d((x - i) mod k) + alpha) / (sum_s d(s) + k alpha); its Bayes-optimal strategy pools
  every row's transitions by their step, which the in-context bigram statistics do not.
- ``prior: bank`` (order 2): the paper's doubly stochastic prior, kept as a finite bank of
  ``bank_size`` matrices drawn once from ``bank_seed`` (each Dirichlet(alpha) rows balanced by
  Sinkhorn's iteration until every row and column sums to 1), each equally likely. No conjugacy is
  needed: the predictive is the exact Bayesian average over the bank, p(x | i) = sum_m w_m P_m[i, x]
  with w_m proportional to the likelihood of the chain's transitions under P_m, which the
  transition counts hold: w = softmax_m(sum_ij count(i -> j) log P_m[i, j]). Unigram statistics
  say nothing here either; its Bayes-optimal strategy (``bank``) weighs whole matrices, which the
  in-context bigram statistics approach as the counts grow.

The chain fires where the current token and the ``order - 2`` before it are states, and emits a
state (with p). How it composes with other primitives (each checked when the language is loaded,
with a one-line error otherwise):

- a whole sequence, as in the paper: states as one category, the start distribution and the
  category fallback on it (which also supplies the first ``order - 1`` states);
- segments: another rule emits a state (the chain is entered; that first state carries no
  likelihood under the chain), and with p < 1 the chain is left with probability 1 - p, to what
  the rules below emit there, which must not be a state (else whether the chain emitted would be
  a hidden coin); one sequence's segments share their counts;
- counts grow only at positions the chain labelled: a higher rule that takes a position (it must
  have p = 1: with p < 1 the chain would emit unseen) or a suppression leaves them unchanged.

Strategies (the strategy curves): in-context unigram, bigram, ... up to the order, each the
smoothed statistics of the visible states ((count + alpha) / (total + k alpha) over the visible
windows of states), and for the circulant prior its Bayes-optimal ``circulant`` predictive. With
the Dirichlet prior the top one equals the truth wherever every visible window of states is one
the chain emitted (a whole-sequence language).

Example (k = 3, order 2)::

    s0 s1 s1 s0 s1 s1 ...   p(s1 | s1) = (1 + alpha) / (1 + 3 alpha) after one s1 -> s1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devinterp.language.arrays import NUMPY, Array, arrays_of
from devinterp.language.primitive import Firing, Primitive, RuleSupport
from devinterp.language.spec import SpecError, Vocab, require_int

PRIORS = ("dirichlet", "circulant", "bank")
SINKHORN_TOLERANCE = 1e-12
GRAM_NAMES = {1: "unigram", 2: "bigram", 3: "trigram"}


def gram_name(n: int) -> str:
    """unigram, bigram, trigram, 4-gram, ..."""
    return GRAM_NAMES.get(n, f"{n}-gram")


def context_key(state_at, t: int, length: int, k: int, like: Array) -> tuple[Array, Array]:
    """(n,) whether the ``length`` tokens ending at position t are all states, and their key in
    base k (the token at t the lowest digit); ``state_at(j)`` (n,) is the state index of token j
    (-1: not a state), ``like`` an (n,) array of the namespace (numpy or torch) to make them in."""
    xp, n = arrays_of(like), like.shape[0]
    holds, key = xp.full(n, t >= length - 1, xp.bool), xp.full(n, 0)
    if t < length - 1:
        return holds, key
    for back in range(length):
        state = state_at(t - back)
        holds = holds & (state >= 0)
        key = key + state.clip(min=0) * k**back
    return holds, key


@dataclass
class ChainState:
    """Per sequence: the chain's counts and what it did at the last position."""

    counts: Array  # (n, k^(order-1), k) dirichlet and bank; (n, k) circulant: transitions by their step
    context: Array  # (n,) the context key (or, circulant, the current state) at the last position
    took: Array  # (n,) bool: the chain labelled the last position


class MarkovICL(Primitive):
    kind = "markov_icl"
    extra_keys = {"states", "alpha", "order", "prior", "bank_size", "bank_seed"}

    def __init__(
        self,
        name: str,
        p: float,
        vocab: Vocab,
        states: list[int],
        alpha: float,
        order: int,
        prior: str,
        bank_size: int = 1024,
        bank_seed: int = 0,
    ):
        self.states = np.asarray(states, dtype=np.int64)  # (k,) token ids
        super().__init__(name, p, vocab, rule_names=[vocab.tokens[s] for s in states])
        self.k, self.alpha, self.order, self.prior = len(states), alpha, order, prior
        self.index = np.full(vocab.size, -1, dtype=np.int64)  # (V,) token -> state index, -1 not a state
        self.index[self.states] = np.arange(self.k)
        if prior == "bank":
            self.bank = doubly_stochastic_bank(self.k, alpha, bank_size, bank_seed)  # (M, k, k)
            self.bank_flat = self.bank.reshape(bank_size, self.k * self.k)  # (M, k k)
            self.log_bank_flat = np.log(self.bank_flat).T.copy()  # (k k, M)

    @classmethod
    def parse(cls, spec, vocab, field, name, p):
        states = vocab.token_ids(spec.get("states"), f"{field}.states")
        if len(states) < 2:
            raise SpecError(f"{field}.states: a chain needs at least 2 states, got {len(states)}")
        alpha = spec.get("alpha", 1.0)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not alpha > 0
            or alpha == float("inf")
        ):
            raise SpecError(f"{field}.alpha: expected a positive Dirichlet concentration, got {alpha!r}")
        order = require_int(spec.get("order", 2), f"{field}.order", 2)
        prior = spec.get("prior", "dirichlet")
        if prior not in PRIORS:
            raise SpecError(f"{field}.prior: expected one of {', '.join(PRIORS)}, got {prior!r}")
        if prior in ("circulant", "bank") and order != 2:
            raise SpecError(f"{field}.order: the {prior} prior is for order 2 (bigram chains), got {order}")
        for key in ("bank_size", "bank_seed"):
            if key in spec and prior != "bank":
                raise SpecError(f"{field}.{key}: only the bank prior has a bank (prior is {prior!r})")
        bank_size = require_int(spec.get("bank_size", 1024), f"{field}.bank_size", 1)
        bank_seed = require_int(spec.get("bank_seed", 0), f"{field}.bank_seed", 0)
        if len(states) ** (order - 1) > 4096:
            raise SpecError(f"{field}.order: {len(states)} states at order {order} give too many contexts")
        return cls(name, p, vocab, states, float(alpha), order, prior, bank_size, bank_seed)

    def check_sequence_length(self, seq_len: int, field: str) -> None:
        if self.order > seq_len - 1:
            raise SpecError(
                f"{field}.order: {self.order} needs sequences longer than {self.order}, got {seq_len}"
            )

    def check_place(self, above, below, field):
        """The posterior predictive is exact only if the chain's emissions are identifiable: a
        rule above with p < 1 would let the chain emit at a position another rule labelled, and
        with p < 1 a rule below that can emit a state would hide which of them did."""
        for primitive in above:
            if primitive.p < 1:
                raise SpecError(
                    f"{field}: {self.name!r} comes below {primitive.name!r} with p = {primitive.p}: "
                    "a chain must be first, or below rules with p = 1 (else its emissions are hidden)"
                )
        if self.p == 1:
            return
        states = set(self.states.tolist())
        for primitive in below:
            table = getattr(primitive, "token_table", None)  # the category fallback: per state row
            emits = (
                set(np.flatnonzero(table[self.states].sum(0) > 0).tolist())
                if table is not None and primitive.kind == "category"
                else set().union(*(s.emits for s in primitive.rule_supports()))
            )
            if emits & states:
                raise SpecError(
                    f"{field}.p: {self.name!r} has p = {self.p} but {primitive.name!r} below it can emit "
                    f"state {self.vocab.tokens[min(emits & states)]!r}: which rule emitted a state would be "
                    "hidden (use p = 1, or a lower rule that leaves the chain to other tokens)"
                )

    def begin(self, n, xp=NUMPY):
        shape = (n, self.k) if self.prior == "circulant" else (n, self.k ** (self.order - 1), self.k)
        return ChainState(xp.zeros(shape), xp.full(n, 0), xp.full(n, False, xp.bool))

    def fire(self, state: ChainState, tokens, t):
        xp = arrays_of(tokens)
        n = tokens.shape[0]
        rows = xp.arange(n)
        current = self.index[tokens[:, t]]  # (n,)
        if t > 0:  # the transition into token t, where the chain labelled position t - 1
            emitted = xp.as_float(state.took & (current >= 0))
            if self.prior == "circulant":
                step = (current.clip(min=0) - state.context) % self.k
                state.counts[rows, step] += emitted
            else:
                state.counts[rows, state.context, current.clip(min=0)] += emitted
        fires, key = context_key(lambda j: self.index[tokens[:, j]], t, self.order - 1, self.k, current)
        state.context = key
        if self.prior == "bank":
            predictive = self._bank_predictive(xp, state.counts, key)
        else:
            if self.prior == "circulant":  # order 2: the key is the current state
                steps = (xp.arange(self.k)[None, :] - key[:, None]) % self.k  # (n, k): step to each state
                counts = state.counts[rows[:, None], steps]  # (n, k)
            else:
                counts = state.counts[rows, key]  # (n, k)
            predictive = (counts + self.alpha) / (counts.sum(1) + self.k * self.alpha)[:, None]
        probs = xp.zeros((n, self.vocab.size))
        probs[:, self.states] = predictive
        rule = xp.where(fires, current.clip(min=0), -1)
        return Firing(fires=fires, rule=rule, dist=xp.full(n, 0), probs=probs)

    def took_positions(self, state: ChainState, took):
        state.took = took

    def strategies(self, tokens):
        """In-context k-gram statistics of the visible states for k = 1 .. order, smoothed with
        alpha; with the circulant or bank prior also its posterior predictive from the visible
        state pairs (``circulant``, ``bank``)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n, T = tokens.shape
        index = self.index[tokens]  # (n, T)
        out = {}
        rows = np.arange(n)
        for size in range(1, self.order + 1):
            predictions = np.zeros((n, T, self.vocab.size))
            counts = np.zeros((n, self.k ** (size - 1), self.k))
            # the context ending at t - 1 (at t = 0 only the empty one, a unigram's, holds)
            holds, key = np.full(n, size == 1), np.zeros(n, dtype=np.int64)
            for t in range(T):  # the window of ``size`` tokens ending at t, when it is all states
                counts[rows, key, index[:, t].clip(min=0)] += holds & (index[:, t] >= 0)
                holds, key = context_key(lambda j: index[:, j], t, size - 1, self.k, index[:, t])
                row = counts[rows, key]
                predictions[:, t, self.states] = (row + self.alpha) / (row.sum(1) + self.k * self.alpha)[
                    :, None
                ]
            out[gram_name(size)] = predictions
        if self.prior == "circulant":
            out["circulant"] = self._circulant_strategy(index)
        if self.prior == "bank":
            out["bank"] = self._bank_strategy(index)
        return out

    def _bank_predictive(self, xp, counts: Array, key: Array) -> Array:
        """(n, k) the bank's posterior predictive from each sequence's transition counts (n, k, k)
        at the current state ``key`` (n,): the posterior over the bank (n, M), its mean matrix,
        the key's row."""
        n = counts.shape[0]
        weights = xp.softmax_rows(counts.reshape(n, self.k * self.k) @ self.log_bank_flat)
        return (weights @ self.bank_flat).reshape(n, self.k, self.k)[xp.arange(n), key]

    def _bank_strategy(self, index: np.ndarray) -> np.ndarray:
        """The bank's predictive from the visible state pairs (every one counted as the chain's)."""
        n, T = index.shape
        predictions = np.zeros((n, T, self.vocab.size))
        counts = np.zeros((n, self.k, self.k))
        rows = np.arange(n)
        for t in range(T):
            if t > 0:
                both = (index[:, t - 1] >= 0) & (index[:, t] >= 0)
                counts[rows, index[:, t - 1].clip(min=0), index[:, t].clip(min=0)] += both
            predictions[:, t, self.states] = self._bank_predictive(NUMPY, counts, index[:, t].clip(min=0))
        return predictions

    def _circulant_strategy(self, index: np.ndarray) -> np.ndarray:
        n, T = index.shape
        predictions = np.zeros((n, T, self.vocab.size))
        by_step = np.zeros((n, self.k))
        rows = np.arange(n)
        for t in range(T):
            if t > 0:
                both = (index[:, t - 1] >= 0) & (index[:, t] >= 0)
                by_step[rows, (index[:, t] - index[:, t - 1]) % self.k] += both
            steps = (np.arange(self.k)[None, :] - index[:, t].clip(min=0)[:, None]) % self.k
            row = by_step[rows[:, None], steps]
            predictions[:, t, self.states] = (row + self.alpha) / (row.sum(1) + self.k * self.alpha)[:, None]
        return predictions

    def rule_supports(self):
        """Needs a state, emits states."""
        states = frozenset(self.states.tolist())
        return [RuleSupport((states,), states) for _ in self.rule_names]

    def ground_truth(self):
        truth = {
            "states": self.states,
            "alpha": np.asarray(self.alpha),
            "order": np.asarray(self.order),
            "circulant": np.asarray(self.prior == "circulant"),
        }
        if self.prior == "bank":
            truth["bank"] = self.bank  # (M, k, k): the prior itself
        return truth


def doubly_stochastic_bank(k: int, alpha: float, size: int, seed: int) -> np.ndarray:
    """(size, k, k) doubly stochastic matrices: Dirichlet(alpha) rows balanced by Sinkhorn's
    iteration (columns, then rows, until every column sum is within 1e-12 of 1; rows end exact)."""
    rng = np.random.default_rng(seed)
    bank = rng.dirichlet(np.full(k, alpha), size=(size, k))  # (size, k, k)
    bank = np.maximum(bank, 1e-300)  # a row entry that underflowed to 0 would stall the balancing
    for _ in range(100_000):
        bank /= bank.sum(1, keepdims=True)  # columns
        bank /= bank.sum(2, keepdims=True)  # rows
        if np.abs(bank.sum(1) - 1).max() < SINKHORN_TOLERANCE:
            return bank
    raise SpecError(f"bank_seed {seed}: Sinkhorn balancing did not converge; try another seed or alpha")
