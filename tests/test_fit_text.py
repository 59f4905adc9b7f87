"""`devinterp language fit-text`: a spec estimated from text loads and reproduces its counts."""

from collections import Counter

import numpy as np
import pytest
import yaml

from devinterp.cli.main import main
from devinterp.language import load_language

TEXT = "the cat sat on the mat . the dog sat on the log . a cat saw a dog . the end ."


def test_fit_text_counts_bigrams_and_maps_rare_tokens_to_unk(tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text(TEXT)
    assert main(["language", "fit-text", str(text), "--vocab", "6"]) == 0
    spec_path = tmp_path / "story.yaml"
    assert capsys.readouterr().out.strip() == f"spec: {spec_path}"
    language = load_language(spec_path)
    words = TEXT.split()
    kept = {t for t, _ in sorted(Counter(words).items(), key=lambda i: (-i[1], i[0]))[:6]}
    assert set(language.vocab.tokens) == kept | {"<unk>"}
    mapped = [w if w in kept else "<unk>" for w in words]
    # an independent recount of every bigram row
    spec = yaml.safe_load(spec_path.read_text())
    table = spec["primitives"][0]["table"]
    for source in kept | {"<unk>"}:
        followers = Counter(b for a, b in zip(mapped, mapped[1:]) if a == source)
        total = sum(followers.values())
        assert table[source] == pytest.approx({t: n / total for t, n in followers.items()})
    # the fallback emits the unigram distribution: within-category weights are the counts
    weights = dict(zip(language.vocab.tokens, language.vocab.within_category))
    assert weights["the"] == pytest.approx(Counter(mapped)["the"] / len(mapped))
    # it samples, and `language show` reads it
    sample = language.sample(4, 12, seed=0)
    assert sample.tokens.shape == (4, 12) and np.isin(sample.labels[:, 1:], [1, 2]).all()
    assert main(["language", "show", str(spec_path), "--n", "1", "--n-stats", "50", "--seq-len", "12"]) == 0
    # the spec is never overwritten
    assert main(["language", "fit-text", str(text)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content,args,message",
    [
        ("word", [], "fewer than 2 tokens"),
        ("a b c", ["--vocab", "0"], "--vocab: must be at least 1"),
    ],
)
def test_fit_text_refuses_what_it_cannot_fit(tmp_path, capsys, content, args, message):
    text = tmp_path / "t.txt"
    text.write_text(content)
    assert main(["language", "fit-text", str(text), *args]) == 2
    assert message in capsys.readouterr().err
