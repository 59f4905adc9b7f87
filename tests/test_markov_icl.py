"""In-context Markov chains: the exact posterior predictive against a Monte Carlo reference that
never counts (transition matrices drawn from the prior, weighted by the prefix's likelihood), the
sampler against the exact distributions, the strategies against direct per-sequence statistics,
and bad specs."""

import numpy as np
import pytest
import yaml
from scipy.stats import chisquare

from devinterp.language import SpecError, parse_language
from tests.test_language import SAMPLERS, draw

STATES = ["a", "b", "c"]


def chain_spec(order=2, prior="dirichlet", alpha=1.0, p=1.0, exit_to=None, **extra):
    """A whole-sequence chain over a, b, c; with ``exit_to`` a token x the chain is left with
    probability 1 - p to x, and x is followed by a uniform state (a new segment)."""
    categories = {"STATE": list(STATES)}
    transitions = {"STATE": {"STATE": 1.0}}
    if exit_to:
        categories["OUT"] = [exit_to]
        transitions = {"STATE": {"OUT": 1.0}, "OUT": {"STATE": 1.0}}
    chain = {"type": "markov_icl", "name": "chain", "states": ["STATE"], "alpha": alpha, "order": order}
    chain.update(prior=prior, p=p, **extra)
    return {
        "name": "chain",
        "categories": categories,
        "start": {"STATE": 1.0},
        "primitives": [chain, {"type": "category", "transitions": transitions}],
    }


def draw_matrices(rng, prior, alpha, order, n_draws, bank=None):
    """(n_draws, k^(order-1), k) transition matrices from the prior, row key in base k with the
    most recent state the lowest digit; for the bank prior every matrix of ``bank`` once (exact
    enumeration: the prior is uniform over them)."""
    k = len(STATES)
    if prior == "bank":
        return bank
    if prior == "circulant":
        w = rng.dirichlet(np.full(k, alpha), size=n_draws)  # (D, k)
        steps = (np.arange(k)[None, :] - np.arange(k)[:, None]) % k  # (i, j) -> (j - i) mod k
        return w[:, steps]
    return rng.dirichlet(np.full(k, alpha), size=(n_draws, k ** (order - 1)))


def monte_carlo_predictive(tokens, chain_positions, prior, alpha, order, n_draws=200_000, seed=0, bank=None):
    """(T, k) p(next state | tokens <= t) at every t by importance weighting: matrices from the
    prior, weights their likelihood of the transitions the chain made (into the positions
    ``chain_positions``), the predictive the weighted mean of the current context's row."""
    rng = np.random.default_rng(seed)
    k = len(STATES)
    P = draw_matrices(rng, prior, alpha, order, n_draws, bank)  # (D, C, k)
    n_draws = len(P)
    index = {name: i for i, name in enumerate(STATES)}

    def key(t):
        return sum(index[tokens[t - back]] * k**back for back in range(order - 1))

    log_weight = np.zeros(n_draws)
    out = []
    for t in range(len(tokens)):
        if t in chain_positions:  # token t was emitted by the chain after the context ending at t - 1
            log_weight += np.log(P[:, key(t - 1), index[tokens[t]]])
        if t >= order - 2 and all(tokens[t - b] in index for b in range(order - 1)):
            w = np.exp(log_weight - log_weight.max())
            out.append((w[:, None] * P[:, key(t)]).sum(0) / w.sum())
        else:
            out.append(None)
    return out


CASES = {
    "bigram": dict(order=2),
    "bigram_alpha_0.5": dict(order=2, alpha=0.5),
    "trigram": dict(order=3),
    "circulant": dict(order=2, prior="circulant"),
    "bank": dict(order=2, prior="bank", alpha=0.5, bank_size=8),  # few, distinct matrices
}


@pytest.mark.parametrize("case", CASES)
def test_posterior_predictive_matches_monte_carlo_over_matrices(case):
    options = CASES[case]
    language = parse_language(chain_spec(**options))
    order, prior, alpha = options["order"], options.get("prior", "dirichlet"), options.get("alpha", 1.0)
    bank = getattr(language.primitives[0], "bank", None)
    rng = np.random.default_rng(1)
    for sequence in range(3):
        seq = list(rng.choice(STATES, size=9))
        ids = np.array([[language.vocab.tokens.index(s) for s in seq]])
        exact = language.true_next_dist(ids)[0][:, [language.vocab.tokens.index(s) for s in STATES]]
        reference = monte_carlo_predictive(
            seq, set(range(order - 1, len(seq))), prior, alpha, order, seed=sequence, bank=bank
        )
        for t, row in enumerate(reference):
            if row is not None:
                np.testing.assert_allclose(exact[t], row, atol=0.012, err_msg=f"{case} {seq} t={t}")


def test_segments_share_counts_and_exits_carry_no_likelihood():
    """A chain left with probability 0.3 (to x, then a uniform state re-enters): the transitions
    into x and out of it are not the chain's, every state -> state one is, across segments."""
    language = parse_language(chain_spec(p=0.7, exit_to="x"))
    seq = ["a", "b", "b", "x", "b", "b", "x", "a", "b", "b"]
    ids = np.array([[language.vocab.tokens.index(s) for s in seq]])
    chain_positions = {t for t in range(1, len(seq)) if seq[t] in STATES and seq[t - 1] in STATES}
    reference = monte_carlo_predictive(seq, chain_positions, "dirichlet", 1.0, 2)
    exact = language.true_next_dist(ids)[0]
    columns = [language.vocab.tokens.index(s) for s in STATES]
    x = language.vocab.tokens.index("x")
    for t, row in enumerate(reference):
        if row is not None:  # at a state: 0.7 on the chain's predictive, 0.3 on leaving
            np.testing.assert_allclose(exact[t, columns], 0.7 * row, atol=0.01, err_msg=f"t={t}")
            assert exact[t, x] == pytest.approx(0.3)
    labels, _ = language.label(ids)
    assert [language.label_names[i] for i in labels[0, 1:]] == [
        "chain" if seq[t - 1] in STATES else "category" for t in range(1, len(seq))
    ]


def test_a_higher_rule_that_takes_a_position_leaves_the_counts_alone():
    """A bigram rule b -> c (p = 1) above a circulant chain takes every position after b: its
    b -> c is not the chain's transition, so the step +1 it makes is not counted (the circulant
    prior pools every row's steps, so a wrong count would show after a and c)."""
    spec = chain_spec(prior="circulant")
    spec["primitives"].insert(0, {"type": "bigram", "name": "forced", "p": 1.0, "table": {"b": {"c": 1.0}}})
    language = parse_language(spec)
    seq = ["a", "b", "c", "a", "b", "c", "a"]
    ids = np.array([[language.vocab.tokens.index(s) for s in seq]])
    chain_positions = {t for t in range(1, len(seq)) if seq[t - 1] != "b"}
    reference = monte_carlo_predictive(seq, chain_positions, "circulant", 1.0, 2)
    exact = language.true_next_dist(ids)[0][:, [language.vocab.tokens.index(s) for s in STATES]]
    for t in (0, 2, 3, 5, 6):  # the chain's positions (after a and c)
        np.testing.assert_allclose(exact[t], reference[t], atol=0.01, err_msg=f"t={t}")
    np.testing.assert_allclose(exact[4], [0, 0, 1])  # the bigram's


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("case", CASES)
def test_labels_and_logp_agree_with_the_exact_distributions(case, sampler):
    language = parse_language(chain_spec(**CASES[case]))
    sample = draw(language, 300, 24, 5, sampler)
    dist = language.true_next_dist(sample.tokens)
    n, T = sample.tokens.shape
    picked = dist[np.arange(n)[:, None], np.arange(T - 1)[None, :], sample.tokens[:, 1:]]
    np.testing.assert_allclose(sample.logp[:, 1:], np.log(picked), rtol=1e-10)
    labels, rules = language.label(sample.tokens)
    np.testing.assert_array_equal(labels, sample.labels)
    np.testing.assert_array_equal(rules, sample.rules)
    first = CASES[case]["order"]  # the chain labels every token after the first order - 1
    assert (sample.labels[:, first:] == 1).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("case", ["bigram", "circulant", "bank"])
def test_whole_sequences_occur_as_often_as_their_exact_probability(case, sampler):
    """Sequences of 5 states (243 outcomes): the sampler's counts against the product of the
    exact next-token probabilities (chi-square), which the Monte Carlo test ties to the prior."""
    language = parse_language(chain_spec(**CASES[case]))
    sample = draw(language, 40_000, 5, 3, sampler)
    k = len(STATES)
    columns = {language.vocab.tokens.index(s): i for i, s in enumerate(STATES)}
    codes = sum(np.vectorize(columns.get)(sample.tokens[:, t]) * k**t for t in range(5))
    observed = np.bincount(codes, minlength=k**5)
    every = np.array(np.meshgrid(*[range(k)] * 5, indexing="ij")).reshape(5, -1).T[:, ::-1]  # code order
    ids = np.array([language.vocab.tokens.index(s) for s in STATES])[every]
    dist = language.true_next_dist(ids)
    probability = language.start_dist[ids[:, 0]] * np.prod(
        dist[np.arange(len(ids))[:, None], np.arange(4)[None], ids[:, 1:]], axis=1
    )
    order = sum(every[:, t] * k**t for t in range(5))
    expected = np.zeros(k**5)
    expected[order] = probability * len(codes)
    assert expected.sum() == pytest.approx(len(codes))
    assert chisquare(observed, expected).pvalue > 1e-4


def test_the_bank_prior_is_the_process_that_draws_a_matrix_first():
    """A matrix drawn uniformly from the bank, then 5 states run on it (the first uniform): the
    frequencies of the 243 sequences against the product of the language's exact predictive
    probabilities; and every bank matrix is doubly stochastic."""
    language = parse_language(chain_spec(**CASES["bank"]))
    bank = language.primitives[0].bank  # (8, 3, 3)
    np.testing.assert_allclose(bank.sum(2), 1, atol=1e-12)
    np.testing.assert_allclose(bank.sum(1), 1, atol=1e-11)
    rng = np.random.default_rng(5)
    n, k = 60_000, len(STATES)
    matrices = bank[rng.integers(len(bank), size=n)]  # (n, k, k)
    states = np.zeros((n, 5), dtype=np.int64)
    states[:, 0] = rng.integers(k, size=n)
    for t in range(1, 5):
        row = matrices[np.arange(n), states[:, t - 1]]  # (n, k)
        states[:, t] = (rng.random(n)[:, None] > row.cumsum(1)).sum(1)
    observed = np.bincount(sum(states[:, t] * k**t for t in range(5)), minlength=k**5)
    every = np.array(np.meshgrid(*[range(k)] * 5, indexing="ij")).reshape(5, -1).T  # (243, 5)
    ids = np.array([language.vocab.tokens.index(s) for s in STATES])[every]
    dist = language.true_next_dist(ids)
    probability = np.prod(dist[np.arange(len(ids))[:, None], np.arange(4)[None], ids[:, 1:]], axis=1) / k
    expected = np.zeros(k**5)
    expected[sum(every[:, t] * k**t for t in range(5))] = probability * n
    assert expected.sum() == pytest.approx(n)
    assert chisquare(observed, expected).pvalue > 1e-4
    uniform_bigram = np.full(k**5, n / k**5)  # the test can fail: the bank's sequences are not uniform
    assert chisquare(observed, uniform_bigram).pvalue < 1e-6


def direct_gram(seq_states, t, size, alpha, k=3):
    """The smoothed in-context size-gram prediction after position t, counted by hand."""
    context = tuple(seq_states[t - size + 2 : t + 1]) if size > 1 else ()
    counts = np.zeros(k)
    for end in range(size - 1, t + 1):
        window = tuple(seq_states[end - size + 1 : end + 1])
        if window[:-1] == context:
            counts[window[-1]] += 1
    return (counts + alpha) / (counts.sum() + k * alpha)


@pytest.mark.parametrize("case", CASES)
def test_strategies_are_the_in_context_statistics(case):
    options = CASES[case]
    language = parse_language(chain_spec(**options))
    chain = language.primitives[0]
    sample = language.sample(20, 16, 2)
    strategies = chain.strategies(sample.tokens)
    truth = language.true_next_dist(sample.tokens)
    columns = [language.vocab.tokens.index(s) for s in STATES]
    for n in range(20):
        states = [columns.index(x) for x in sample.tokens[n]]
        for t in range(options["order"] - 1, 16):
            for size in range(1, options["order"] + 1):
                name = {1: "unigram", 2: "bigram", 3: "trigram"}[size]
                np.testing.assert_allclose(
                    strategies[name][n, t, columns], direct_gram(states, t, size, options.get("alpha", 1.0))
                )
    prior = options.get("prior", "dirichlet")
    top = prior if prior != "dirichlet" else {2: "bigram", 3: "trigram"}[options["order"]]
    np.testing.assert_allclose(strategies[top][:, options["order"] - 2 :], truth[:, options["order"] - 2 :])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["primitives"][0].update(alpha=0), "primitives[0].alpha: expected a positive"),
        (lambda s: s["primitives"][0].update(alpha="one"), "primitives[0].alpha"),
        (lambda s: s["primitives"][0].update(states=["a"]), "primitives[0].states: a chain needs at least 2"),
        (lambda s: s["primitives"][0].update(prior="uniform"), "primitives[0].prior: expected one of"),
        (lambda s: s["primitives"][0].update(prior="circulant", order=3), "circulant prior is for order 2"),
        (lambda s: s["primitives"][0].update(prior="bank", order=3), "bank prior is for order 2"),
        (lambda s: s["primitives"][0].update(bank_size=8), "primitives[0].bank_size: only the bank prior"),
        (lambda s: s["primitives"][0].update(prior="bank", bank_size=0), "primitives[0].bank_size"),
        (lambda s: s["primitives"][0].update(order=1), "primitives[0].order"),
        (lambda s: s["primitives"][0].update(p=0.5), "primitives[0].p: 'chain' has p = 0.5 but 'category'"),
        (
            lambda s: s["primitives"].insert(0, {"type": "bigram", "p": 0.5, "table": {"a": {"b": 1.0}}}),
            "primitives[1]: 'chain' comes below 'bigram' with p = 0.5",
        ),
    ],
)
def test_bad_chain_specs_give_one_clear_error(change, message, tmp_path):
    spec = chain_spec()
    change(spec)
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(spec))
    from devinterp.language import load_language

    with pytest.raises(SpecError) as error:
        load_language(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_order_longer_than_the_sequence_is_refused_when_compiled():
    language = parse_language(chain_spec(order=4))
    with pytest.raises(SpecError, match="order: 4 needs sequences longer"):
        language.check_sequence_length(4)


def test_the_shipped_chain_languages_are_the_papers_task():
    from devinterp.language import load_language

    for path, prior in [
        ("configs/languages/markov_icl.yaml", "dirichlet"),
        ("configs/languages/markov_circulant.yaml", "circulant"),
        ("configs/languages/markov_bank.yaml", "bank"),
    ]:
        chain = load_language(path).primitives[0]
        assert (chain.kind, chain.prior, chain.k, chain.alpha, chain.order) == (
            "markov_icl",
            prior,
            3,
            1.0,
            2,
        )
