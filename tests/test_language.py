import copy

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from devinterp.language import Sample, SpecError, load_language, parse_language
from tests.conftest import (
    BRACKET_SPEC,
    MIXING_SPEC,
    QUOTE_SPEC,
    RANGE_TOPIC_SPEC,
    SEED_SPEC_PATH,
    TRIGRAM_SPEC,
    seed_spec,
)
from tests.helpers.reference_dgp import reference_label, reference_next_dist

SPECS = {
    "seed": seed_spec(),
    "mixing": MIXING_SPEC,
    "trigram": TRIGRAM_SPEC,
    "range_topic": RANGE_TOPIC_SPEC,
    "quoting": QUOTE_SPEC,
    "bracketing": BRACKET_SPEC,
}


SAMPLERS = ("numpy", "device")  # the device sampler runs here in torch on the CPU


def draw(language, n, seq_len, seed, sampler="numpy"):
    """``language.sample`` by either sampler, as numpy arrays."""
    if sampler == "numpy":
        return language.sample(n, seq_len, seed)
    sample = language.sample_streams(n, seq_len, [seed], device="cpu")[0]
    assert all(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in sample)
    return Sample(*(a.numpy() for a in sample))


@pytest.fixture(scope="module")
def seed_language():
    return load_language(SEED_SPEC_PATH)


@pytest.fixture(scope="module")
def seed_sample(seed_language):
    return seed_language.sample(4000, 64, seed=7)


# ---- exact distributions against the independent reference ----------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_true_next_dist_matches_reference_on_random_sequences(name):
    spec = SPECS[name]
    language = parse_language(copy.deepcopy(spec))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, language.d_vocab, size=(150, 14))
    ours = language.true_next_dist(tokens)
    for row in range(tokens.shape[0]):
        seq = language.decode(tokens[row])
        np.testing.assert_allclose(ours[row], reference_next_dist(spec, seq), atol=1e-12)


@pytest.mark.parametrize("name", SPECS)
def test_true_next_dist_matches_reference_on_sampled_sequences(name):
    spec = SPECS[name]
    language = parse_language(copy.deepcopy(spec))
    sample = language.sample(40, 24, seed=3)
    ours = language.true_next_dist(sample.tokens)
    for row in range(sample.tokens.shape[0]):
        np.testing.assert_allclose(
            ours[row], reference_next_dist(spec, language.decode(sample.tokens[row])), atol=1e-12
        )


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", SPECS)
def test_labels_match_reference_precedence(name, sampler):
    spec = SPECS[name]
    language = parse_language(copy.deepcopy(spec))
    sample = draw(language, 60, 20, 5, sampler)
    for row in range(sample.tokens.shape[0]):
        seq = language.decode(sample.tokens[row])
        got = [language.label_names[i] for i in sample.labels[row, 1:]]
        assert got == [reference_label(spec, seq, t) for t in range(len(seq) - 1)]
    labels, rules = language.label(sample.tokens)
    np.testing.assert_array_equal(labels, sample.labels)
    np.testing.assert_array_equal(rules, sample.rules)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", SPECS)
def test_logp_is_log_of_true_next_dist_at_the_sampled_token(name, sampler):
    language = parse_language(copy.deepcopy(SPECS[name]))
    sample = draw(language, 200, 32, 11, sampler)
    dist = language.true_next_dist(sample.tokens)
    n, T = sample.tokens.shape
    picked = dist[np.arange(n)[:, None], np.arange(T - 1)[None, :], sample.tokens[:, 1:]]
    np.testing.assert_allclose(sample.logp[:, 1:], np.log(picked), rtol=1e-12)
    np.testing.assert_allclose(sample.logp[:, 0], np.log(language.start_dist[sample.tokens[:, 0]]))
    np.testing.assert_allclose(dist.sum(-1), 1.0, atol=1e-12)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", SPECS)
def test_sampled_tokens_follow_the_exact_next_token_distribution(name, sampler):
    """The sampler draws without forming the mixture (rule first, then token); summed over all
    positions, each token's count must match its expected count under ``true_next_dist``
    (a sum of Bernoullis: z-score against its exact variance). The device sampler's stream is
    another than numpy's, so this, not bit-identity, is what checks it."""
    language = parse_language(copy.deepcopy(SPECS[name]))
    sample = draw(language, 3000, 16, 13, sampler)
    dist = language.true_next_dist(sample.tokens)[:, :-1].reshape(-1, language.d_vocab)  # (n * (T-1), V)
    observed = np.bincount(sample.tokens[:, 1:].ravel(), minlength=language.d_vocab)
    expected, variance = dist.sum(0), (dist * (1 - dist)).sum(0)
    assert np.all(observed[expected == 0] == 0)  # nothing impossible is ever drawn
    z = (observed - expected)[variance > 0] / np.sqrt(variance[variance > 0])
    assert np.abs(z).max() < 4.5, language.decode(np.flatnonzero(variance > 0)[np.abs(z) > 4.5])


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", SPECS)
def test_streams_sampled_together_equal_streams_sampled_alone(name, sampler):
    language = parse_language(copy.deepcopy(SPECS[name]))
    seeds = [[0, 4], [1, 4], [9, 2]]
    device = None if sampler == "numpy" else "cpu"
    for seed, together in zip(seeds, language.sample_streams(50, 20, seeds, device)):
        alone = draw(language, 50, 20, seed, sampler)
        for a, b in zip(together, alone):
            np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_is_reproducible_and_seed_dependent(seed_language, sampler):
    a, b, c, d = (draw(seed_language, 8, 32, s, sampler) for s in (1, 1, 2, [1, 1]))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens) and not np.array_equal(a.tokens, d.tokens)


def test_the_device_stream_is_another_stream_of_the_same_language(seed_language):
    """The two samplers share no generator: their tokens differ (and both pass the tests above)."""
    assert not np.array_equal(
        draw(seed_language, 8, 32, 1).tokens, draw(seed_language, 8, 32, 1, "device").tokens
    )


# ---- sampled frequencies against the spec (chi-square) ---------------------------------------


def next_token_counts(language, sample, label, current, vocab_subset):
    """Counts of the next token over positions with this label whose current token is given."""
    label_id = language.label_names.index(label)
    at = (sample.labels[:, 1:] == label_id) & (sample.tokens[:, :-1] == language.vocab.tokens.index(current))
    following = sample.tokens[:, 1:][at]
    return np.array([(following == language.vocab.tokens.index(t)).sum() for t in vocab_subset])


@pytest.mark.parametrize(
    "source,table",
    [
        ("alice", {"sees": 0.7, "helps": 0.2, "finds": 0.1}),
        ("bob", {"knows": 0.7, "likes": 0.2, "meets": 0.1}),
        ("carol", {"calls": 0.7, "tells": 0.2, "sees": 0.1}),
    ],
)
def test_bigram_frequencies_match_spec(seed_language, seed_sample, source, table):
    counts = next_token_counts(seed_language, seed_sample, "bigram", source, list(table))
    expected = np.array(list(table.values())) * counts.sum()
    assert counts.sum() > 300
    assert chisquare(counts, expected).pvalue > 1e-3


def test_category_transition_frequencies_match_spec(seed_language, seed_sample):
    # after a verb at a category-labelled position: DET .7, NAME .3, each token uniform within
    label_id = seed_language.label_names.index("category")
    verbs = np.isin(
        seed_sample.tokens[:, :-1],
        [
            seed_language.vocab.tokens.index(v)
            for v in ("sees", "helps", "finds", "knows", "likes", "meets", "calls", "tells")
        ],
    )
    following = seed_sample.tokens[:, 1:][(seed_sample.labels[:, 1:] == label_id) & verbs]
    targets = ["the", "a", "alice", "bob", "carol", "dave", "erin", "frank", "grace", "henry"]
    counts = np.array([(following == seed_language.vocab.tokens.index(t)).sum() for t in targets])
    expected = np.array([0.35, 0.35] + [0.3 / 8] * 8) * counts.sum()
    assert counts.sum() == following.size > 1000
    assert chisquare(counts, expected).pvalue > 1e-3


def test_start_distribution_matches_spec(seed_language, seed_sample):
    counts = np.bincount(seed_sample.tokens[:, 0], minlength=seed_language.d_vocab)
    names = [
        seed_language.vocab.tokens.index(n)
        for n in ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "henry")
    ]
    assert counts.sum() == counts[names].sum()
    assert chisquare(counts[names]).pvalue > 1e-3


def test_mixture_frequencies_match_p(mixing_spec):
    # bigram x -> {u .5, v .5} with p .8 over the category fallback N -> V (u 2/3, v 1/3)
    language = parse_language(mixing_spec)
    sample = language.sample(6000, 12, seed=2)
    counts = next_token_counts(language, sample, "bigram", "x", ["u", "v"])
    expected = np.array([0.8 * 0.5 + 0.2 * 2 / 3, 0.8 * 0.5 + 0.2 / 3]) * counts.sum()
    assert counts.sum() > 1000
    assert chisquare(counts, expected).pvalue > 1e-3


def test_skip_trigram_and_induction_are_deterministic_at_p1(seed_language, seed_sample):
    for label in ("skip_trigram", "induction"):
        at = seed_sample.labels == seed_language.label_names.index(label)
        assert at.sum() > 1000
        np.testing.assert_allclose(seed_sample.logp[at], 0.0, atol=1e-12)


# ---- hand-checked labels ----------------------------------------------------------------------

HAND_CHECKED = [
    # sentence, label of each token (position 0 is start)
    (
        "alice sees the beach . bob finds a big at the lake",
        "start bigram category bigram category category bigram category bigram skip_trigram category bigram",
    ),
    # a name's repeat copies what followed it last time; its first occurrence uses its table
    (
        "alice sees bob . alice sees a lake near dave helps",
        "start bigram category bigram category induction category bigram category category bigram",
    ),
    (
        "carol tells the lake . carol tells a new or",
        "start bigram category bigram category category induction category bigram skip_trigram",
    ),
    # the anchor 9 tokens before the trigger is outside max_skip 8 ...
    (
        "erin likes the beach . bob knows the old lake near a big office",
        "start bigram category bigram category category bigram category bigram category category category "
        "bigram category",
    ),
    # ... and 8 tokens before it is inside
    (
        "erin likes the beach . bob knows the old lake near big at",
        "start bigram category bigram category category bigram category bigram category category category "
        "skip_trigram",
    ),
]


@pytest.mark.parametrize("sentence,expected", HAND_CHECKED)
def test_labels_on_hand_checked_sequences(seed_language, sentence, expected):
    tokens = np.array([[seed_language.vocab.tokens.index(w) for w in sentence.split()]])
    labels, _ = seed_language.label(tokens)
    assert [seed_language.label_names[i] for i in labels[0]] == expected.split()


# ---- bad specs ---------------------------------------------------------------------------------


def mutate(change):
    spec = seed_spec()
    change(spec)
    return spec


BAD_SPECS = {
    "unknown token": (
        lambda s: s["primitives"][2]["table"]["alice"].update({"flies": 0.0}),
        "primitives[2].table.alice.flies: unknown token 'flies'",
    ),
    "unknown category": (
        lambda s: s["primitives"][3]["transitions"]["NAME"].update({"ANIMAL": 0.0}),
        "transitions.NAME.ANIMAL: unknown category 'ANIMAL'",
    ),
    "duplicate token": (
        lambda s: s["categories"]["VERB"].append("alice"),
        "categories.VERB: duplicate token 'alice'",
    ),
    "probabilities not summing to 1": (
        lambda s: s["primitives"][2]["table"]["alice"].update({"sees": 0.6}),
        "primitives[2].table.alice: probabilities sum to 0.9, not 1",
    ),
    "negative probability": (
        lambda s: s["primitives"][2]["table"]["bob"].update({"knows": 0.9, "meets": -0.1}),
        "primitives[2].table.bob.meets: negative probability -0.1",
    ),
    "max_skip below 1": (
        lambda s: s["primitives"][1].update({"max_skip": 0}),
        "primitives[1].max_skip: must be at least 1, got 0",
    ),
    "empty category": (lambda s: s["categories"].update({"ADJ": []}), "categories.ADJ: empty category"),
    "unknown primitive": (
        lambda s: s["primitives"].insert(0, {"type": "trigram"}),
        "primitives[0].type: unknown primitive 'trigram'",
    ),
    "p above 1": (
        lambda s: s["primitives"][0].update({"p": 1.5}),
        "primitives[0].p: probability 1.5 is above 1",
    ),
    "start unknown category": (
        lambda s: s.update({"start": {"PERSON": 1.0}}),
        "start.PERSON: unknown category 'PERSON'",
    ),
    "missing fallback": (lambda s: s["primitives"].pop(), "exactly one 'category' primitive"),
    "unknown key": (
        lambda s: s["primitives"][1].update({"max_skp": 3}),
        "primitives[1]: unknown key 'max_skp'",
    ),
    "missing transition row": (
        lambda s: s["primitives"][3]["transitions"].pop("END"),
        "no row for category 'END'",
    ),
}


@pytest.mark.parametrize("case", BAD_SPECS)
def test_bad_spec_gives_one_clear_error(case, tmp_path):
    change, message = BAD_SPECS[case]
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(mutate(change)))
    with pytest.raises(SpecError) as error:
        load_language(path)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text


def test_max_skip_checked_against_sequence_length_at_compile_time(tmp_path):
    language = load_language(SEED_SPEC_PATH)  # max_skip 8 loads fine
    language.check_sequence_length(9)
    with pytest.raises(SpecError, match=r"max_skip: 8 must be below the sequence length 8"):
        language.check_sequence_length(8)


@pytest.mark.parametrize(
    "content,message",
    [
        ("categories: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        (None, "cannot read language spec"),
    ],
)
def test_unreadable_spec_files(tmp_path, content, message):
    path = tmp_path / "spec.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SpecError, match=message):
        load_language(path)


def test_knock_out_falls_back_to_the_next_rule(seed_language):
    spec = seed_spec()
    knocked = seed_language.knock_out(["skip_trigram"])
    assert knocked.label_names == ["start", "induction", "bigram", "category"]
    reference = {**spec, "primitives": [p for p in spec["primitives"] if p["type"] != "skip_trigram"]}
    sample = knocked.sample(30, 20, seed=4)
    dist = knocked.true_next_dist(sample.tokens)
    for row in range(30):
        np.testing.assert_allclose(
            dist[row], reference_next_dist(reference, knocked.decode(sample.tokens[row])), atol=1e-12
        )
    only = seed_language.only(["bigram"])
    assert only.label_names == ["start", "bigram", "category"]
    with pytest.raises(SpecError, match="cannot knock out 'category'"):
        seed_language.knock_out(["category"])
    with pytest.raises(SpecError, match="cannot knock out 'trigram': no such primitive"):
        seed_language.knock_out(["trigram"])


@pytest.mark.parametrize("path", sorted((SEED_SPEC_PATH.parent).glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_language_loads_samples_and_shows(path, capsys):
    from devinterp.cli.main import main

    language = load_language(path)
    sample = language.sample(64, 32, seed=0)
    used = set(np.unique(sample.labels[:, 1:]).tolist())
    fallback = len(language.label_names) - 1  # a whole-sequence chain (markov_icl) leaves it no position
    assert used | {fallback} == set(range(1, len(language.label_names)))  # every other primitive fires
    assert fallback in used or language.primitives[0].kind == "markov_icl"
    assert main(["language", "show", str(path), "--n", "1", "--n-stats", "100"]) == 0
    assert f"priority: {' > '.join(language.label_names[1:])}" in capsys.readouterr().out


def test_a_quote_switches_skip_trigrams_off_inside_it():
    language = parse_language(QUOTE_SPEC)
    ids = {t: i for i, t in enumerate(language.vocab.tokens)}
    outside = np.array([[ids[t] for t in ("x", "said", "y", "x", "u")]])
    inside = np.array([[ids[t] for t in ("x", "said", "<<", "x", "u")]])
    # outside a quote the skip-trigram x .. u -> said fires (x within 4 tokens before u)
    assert language.true_next_dist(outside)[0, -1, ids["said"]] == pytest.approx(0.8)
    assert language.label_names[language.next_label(outside)[0]] == "skip_trigram"
    # inside, it is off: the quote's 0.9, then what remains goes to the rules below it
    p = language.true_next_dist(inside)[0, -1]
    assert p[ids["said"]] == 0.0
    assert p[ids[">>"]] == pytest.approx(
        0.9 * 0.3 + 0.1 * 0.2 * 0.5
    )  # the close, and category V -> Q (half of Q)
    assert language.label_names[language.next_label(inside)[0]] == "quote"


@pytest.mark.parametrize(
    "suppresses,message",
    [
        (["nothing"], "'nothing' is not another primitive"),
        (["category"], "'category' is not another primitive"),
        (["quote"], "'quote' is not another primitive"),
    ],
)
def test_suppressing_an_unknown_or_the_fallback_primitive_is_an_error(suppresses, message):
    spec = copy.deepcopy(QUOTE_SPEC)
    spec["primitives"][0]["suppresses"] = suppresses
    with pytest.raises(SpecError, match=message):
        parse_language(spec)


def test_a_close_matches_the_most_recent_open_and_depth_is_limited():
    language = parse_language(BRACKET_SPEC)
    ids = {t: i for i, t in enumerate(language.vocab.tokens)}
    nested = np.array([[ids[t] for t in ("x", "v", "(", "[", "x")]])
    p = language.true_next_dist(nested)[0, -1]
    assert p[ids["]"]] == pytest.approx(0.9 * 0.3)  # the innermost open's close
    assert (
        p[ids[")"]] == 0.0 and p[ids["("]] == 0.0 and p[ids["["]] == 0.0
    )  # no wrong close; depth 2 is the limit
    assert p[ids["v"]] == pytest.approx(
        0.9 * 0.7 * 0.6 + 0.1 * 0.5
    )  # content: x's own row, then the fallback
    once = np.array([[ids[t] for t in ("x", "v", "(", "[", "x", "]", "x")]])
    p = language.true_next_dist(once)[0, -1]
    assert p[ids[")"]] == pytest.approx(0.9 * 0.3) and p[ids["]"]] == 0.0  # back to the outer "("
    assert p[ids["("]] == pytest.approx(0.9 * 0.2 / 2)  # below the limit again: may open
    labels, rules = language.label(once)
    assert [language.rule_names[r] for r in rules[0, 3:]] == [
        "brackets/()",
        "brackets/[]",
        "brackets/[]",
        "brackets/()",
    ]
