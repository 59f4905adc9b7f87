"""Corpora made elsewhere: reading, splitting, streaming, the sampled excess loss, and training
on one end to end (issue: Richer languages)."""

import json
import math

import h5py
import numpy as np
import pytest
import torch

from devinterp.cli.main import main
from devinterp.data import MemberStreams, ProbeSet, ToyLanguageData
from devinterp.language import SpecError, load_language, save_corpus
from devinterp.language.corpus import load_corpus
from devinterp.model import ModelConfig, TensorTransformer
from devinterp.probe import evaluate_probe, grouped_mean
from tests.conftest import ROOT, SEED_SPEC_PATH

TINY = ROOT / "tests" / "data" / "tiny.yaml"


def corpus_arrays(n: int = 60, T: int = 16, seed: int = 0, logp: bool = True) -> dict[str, np.ndarray]:
    """A corpus sampled from the seed language, in a corpus file's own numbering (no start label)."""
    language = load_language(SEED_SPEC_PATH)
    sample = language.sample(n, T, seed=seed)
    arrays = {
        "tokens": sample.tokens,
        "labels": np.maximum(sample.labels - 1, 0),
        "label_names": np.array(language.label_names[1:]),
        "token_strings": np.array(language.vocab.tokens),
    }
    if logp:
        arrays["logp"] = sample.logp
    return arrays


def write_corpus(path, arrays: dict) -> str:
    if str(path).endswith(".npz"):
        np.savez(path, **arrays)
    else:
        with h5py.File(path, "w") as f:
            for key, value in arrays.items():
                f[key] = value.astype(h5py.string_dtype()) if value.dtype.kind == "U" else value
    return str(path)


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".hdf5"])
def test_a_corpus_reads_alike_from_npz_and_hdf5(tmp_path, suffix):
    arrays = corpus_arrays()
    corpus = load_corpus(write_corpus(tmp_path / f"c{suffix}", arrays))
    assert corpus.label_names == ["start", "induction", "skip_trigram", "bigram", "category"]
    np.testing.assert_array_equal(corpus.tokens, arrays["tokens"])
    np.testing.assert_array_equal(
        corpus.labels[:, 1:], arrays["labels"][:, 1:] + 1
    )  # in the language's numbering
    assert (corpus.labels[:, 0] == 0).all()
    np.testing.assert_array_equal(corpus.logp, arrays["logp"])
    assert corpus.vocab.tokens == tuple(arrays["token_strings"].tolist()) and corpus.d_vocab == 33


def test_vocabulary_size_without_token_strings(tmp_path):
    arrays = corpus_arrays(logp=False)
    del arrays["token_strings"]
    assert load_corpus(write_corpus(tmp_path / "a.npz", arrays)).d_vocab == arrays["tokens"].max() + 1
    corpus = load_corpus(write_corpus(tmp_path / "b.npz", arrays | {"vocab_size": np.array(50)}))
    assert corpus.d_vocab == 50 and corpus.vocab.tokens[49] == "t49" and corpus.logp is None


def numbered_corpus(tmp_path, n: int) -> str:
    """Sequence i starts with the two digits of i in base 33, so every row can be identified."""
    arrays = corpus_arrays(n=n, logp=False)
    arrays["tokens"][:, 0], arrays["tokens"][:, 1] = np.divmod(np.arange(n), 33)
    return write_corpus(tmp_path / "numbered.npz", arrays)


def row_ids(tokens: np.ndarray) -> np.ndarray:
    return tokens[..., 0] * 33 + tokens[..., 1]


def test_probe_is_held_out_and_each_member_reads_every_training_sequence_once_per_epoch(tmp_path):
    corpus = load_corpus(numbered_corpus(tmp_path, 50))
    corpus.split(12, seed=3)
    corpus.check_sequence_length(16)
    probe = set(row_ids(corpus.held_out(16).tokens).tolist())
    assert len(probe) == 12
    streams = MemberStreams(corpus, 16, batch_size=7, stream_seeds=[0, 1], steps_per_block=2)
    seen = np.concatenate([streams.block(b)[0] for b in range(8)], axis=1)  # (member, 8 * 14, T)
    ids = row_ids(seen)
    for member in range(2):
        for epoch in range(2):  # 38 training sequences per epoch; blocks cross the epoch boundary
            epoch_ids = ids[member, epoch * 38 : (epoch + 1) * 38]
            assert sorted(epoch_ids.tolist()) == sorted(set(range(50)) - probe)
    assert not np.array_equal(ids[0], ids[1])  # each member in its own order
    again = MemberStreams(corpus, 16, batch_size=7, stream_seeds=[0, 1], steps_per_block=2, start_step=5)
    batch = next(iter(again))  # step 5 = block 2, second step: resumable at any step
    np.testing.assert_array_equal(batch["tokens"].numpy(), seen[:, 5 * 7 : 6 * 7])
    labels = next(iter(again))["labels"].numpy()
    assert labels.min() >= 0 and (labels[..., 0] == 0).all()


def test_sampled_excess_estimates_the_exact_kl(tmp_path):
    """On a corpus from a known language, the corpus's excess (model loss on the next token plus
    its log p) must agree with the exact KL that the language's distributions give, up to
    sampling error: E[-log q(x) + log p(x)] = KL(p || q) at every context."""
    language = load_language(SEED_SPEC_PATH)
    arrays = corpus_arrays(n=1500, T=16, seed=4)
    data = ToyLanguageData(
        write_corpus(tmp_path / "c.npz", arrays), seq_len=16, probe_size=1400, batch_size=64
    )
    corpus_probe = data.probe
    assert corpus_probe.true_next is None and corpus_probe.has_excess
    tokens = corpus_probe.tokens.numpy()
    true_next = language.true_next_dist(tokens)[:, :-1]
    plogp = (true_next * np.log(np.where(true_next > 0, true_next, 1.0))).sum(-1)
    exact_probe = ProbeSet(
        corpus_probe.tokens,
        corpus_probe.labels,
        corpus_probe.rules,
        torch.from_numpy(true_next).float(),
        torch.from_numpy(plogp).float(),
        torch.from_numpy(true_next.argmax(-1)),
    )
    torch.manual_seed(0)
    model = TensorTransformer(
        ModelConfig(d_vocab=33, n_ctx=16, n_members=2, n_layers=1, n_heads=2, d_model=16, d_head=8)
    )
    with torch.no_grad():
        model.W_U.normal_(0, 0.5)  # a non-uniform prediction
    n_labels = len(data.language.label_names)
    sampled = evaluate_probe(model, corpus_probe, n_labels, 0, batch_size=200)
    exact = evaluate_probe(model, exact_probe, n_labels, 0, batch_size=200)
    # per position: the sampled gap minus the exact KL has mean 0; compare within 4 standard errors
    with torch.no_grad():
        log_q = (
            model(corpus_probe.tokens[None, :, :-1].expand(2, -1, -1)).double().log_softmax(-1)
        )  # (M, n, T-1, V)
    nll = -log_q.gather(-1, corpus_probe.tokens[None, :, 1:, None].expand(2, -1, -1, 1))[..., 0]
    gap = nll + torch.from_numpy(arrays["logp"][data.language.probe_rows, 1:])
    kl = (
        torch.from_numpy(true_next)[None]
        * (torch.from_numpy(true_next)[None].clamp_min(1e-300).log() - log_q)
    ).sum(-1)
    labels = corpus_probe.labels[:, 1:].flatten()
    difference = (gap - kl).flatten(1)  # (M, positions)
    for label in range(1, n_labels):
        rows = labels == label
        error = difference[:, rows].std(1) / math.sqrt(int(rows.sum()))
        # (deterministic rules: the gap is the KL itself, error 0)
        assert (
            (sampled.excess_by_label[:, label] - exact.excess_by_label[:, label]).abs() <= 4 * error + 1e-4
        ).all()
        np.testing.assert_allclose(
            sampled.excess_by_label[:, label], gap.flatten(1)[:, rows].mean(1), rtol=1e-4
        )
    error = difference.std(1) / math.sqrt(difference.shape[1])
    assert ((sampled.excess - exact.excess).abs() < 4 * error).all()
    assert ((sampled.excess - exact.excess).abs() < 0.05 * exact.excess).all()  # and the error is small
    # cross-entropy and accuracy against the token that came next
    np.testing.assert_allclose(
        sampled.loss_by_label, grouped_mean(nll.flatten(1).float(), labels, n_labels), rtol=1e-4
    )
    hits = (log_q.argmax(-1) == corpus_probe.tokens[None, :, 1:]).flatten(1).float()
    np.testing.assert_allclose(sampled.accuracy_by_label, grouped_mean(hits, labels, n_labels), rtol=1e-5)


@pytest.mark.parametrize("suffix,logp", [(".npz", False), (".h5", True)])
def test_fit_on_a_corpus_end_to_end(tmp_path, capsys, suffix, logp):
    path = write_corpus(tmp_path / f"corpus{suffix}", corpus_arrays(n=80, logp=logp))
    code = main(
        [
            "fit",
            "--config",
            str(TINY),
            "--run.root",
            str(tmp_path),
            "--run.wandb_mode",
            "disabled",
            "--data.language",
            path,
            "--data.probe_size",
            "16",
            "--circuits.diagnostics_every_n_steps",
            "2",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("notice:") == 1 and "a corpus: no rules with known circuits" in err
    assert ("no logp, so no excess loss" in err) != logp
    run = tmp_path / "tiny"
    with h5py.File(run / "timeline.h5", "r") as f:
        every = [n.decode() for n in f["every_step/names"][:]]
        probe = [n.decode() for n in f["probe/names"][:]]
        assert every == ["train/loss"] + [
            f"train_loss/{n}" for n in ("induction", "skip_trigram", "bigram", "category")
        ]
        loss = f["every_step/values"][:, 0]  # steps 0..5, then the final weights (no batch: NaN)
        assert len(loss) == 7 and np.isfinite(loss[:-1]).all() and np.isnan(loss[-1]).all()
        assert "model/all/weight_norm" in [n.decode() for n in f["diagnostics/names"][:]]
        assert "probe_ce/bigram" in probe and "probe_acc/bigram" in probe
        assert ("probe_excess/bigram" in probe) == logp
        assert f"corpus: {path}" in f["meta/language_spec"][()].decode()
        assert len(f["ground_truth/corpus/probe_rows"][:]) == 16
    summary = json.loads((run / "probe_summary.json").read_text())
    assert summary["measure"] == ("sampled_excess" if logp else "cross_entropy")
    assert set(summary["primitives"]) <= {"induction", "skip_trigram", "bigram", "category"}
    if not logp:  # at step 0 the unembedding is zero: cross-entropy log V everywhere
        assert all(
            math.isclose(row["initial"], math.log(33), rel_tol=1e-5) for row in summary["primitives"].values()
        )
    else:
        assert main(["analyze", str(run), "--out", str(tmp_path / "report")]) == 0
        assert (tmp_path / "report" / "report.md").is_file()


def test_a_corpus_cannot_be_knocked_out_or_cut_longer(tmp_path):
    path = write_corpus(tmp_path / "c.npz", corpus_arrays())
    with pytest.raises(SpecError, match="is a corpus: it has no primitives to knock out"):
        ToyLanguageData(path, seq_len=16, probe_size=8, knockout=["bigram"])
    with pytest.raises(
        SpecError, match="data.seq_len: must be between 2 and the corpus's sequence length 16"
    ):
        ToyLanguageData(path, seq_len=32, probe_size=8)
    assert ToyLanguageData(path, seq_len=8, probe_size=8).probe.tokens.shape == (8, 8)  # a prefix


def test_language_show_reads_a_corpus(tmp_path, capsys):
    arrays = corpus_arrays(n=50)
    path = write_corpus(tmp_path / "c.npz", arrays)
    assert main(["language", "show", path, "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "corpus 'c': 50 sequences of 16 tokens, 33 tokens" in out and "logp: yes" in out
    words = arrays["token_strings"][arrays["tokens"][0]]
    first_line = out.splitlines()[3].split()  # sequence 0 (wrapped), over its labels
    assert len(first_line) > 3 and first_line == words[: len(first_line)].tolist()
    bigram = arrays["labels"][:, 1:] == 2
    table = out.split("generator loss (nats)")[1]
    row = next(line for line in table.splitlines() if line.startswith("bigram "))
    assert row.split()[1] == f"{bigram.mean():.1%}"
    assert float(row.split()[2]) == pytest.approx(-arrays["logp"][:, 1:][bigram].mean(), abs=1e-4)


def test_resume_refuses_a_corpus_that_changed(tmp_path, capsys):
    """A resumed run must train on the data it started with: the timeline keeps the corpus's
    sha256, and a changed file ends the resume in one line with the run folder untouched."""
    path = write_corpus(tmp_path / "c.npz", corpus_arrays(n=40))
    root = tmp_path / "runs"
    fit = [
        "fit",
        "--config",
        str(TINY),
        "--run.root",
        str(root),
        "--run.wandb_mode",
        "disabled",
        "--data.language",
        path,
        "--run.checkpoint_every_n_steps",
        "2",
        "--trainer.max_steps",
        "4",
    ]
    assert main(fit) == 0
    run = root / "tiny"
    write_corpus(tmp_path / "c.npz", corpus_arrays(n=40, seed=9))  # the same shape, other sequences
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main(["resume", str(run), "--trainer.max_steps", "6"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("devinterp: error:")]
    assert len(err) == 1 and "language or corpus has changed since it started" in err[0]
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    write_corpus(tmp_path / "c.npz", corpus_arrays(n=40))  # the original again: the resume runs
    assert main(["resume", str(run), "--trainer.max_steps", "6"]) == 0


def test_resume_refuses_a_language_spec_that_changed_but_not_an_edited_comment(tmp_path, capsys):
    spec = tmp_path / "lang.yaml"
    text = SEED_SPEC_PATH.read_text()
    spec.write_text(text)
    root = tmp_path / "runs"
    assert (
        main(
            [
                "fit",
                "--config",
                str(TINY),
                "--run.root",
                str(root),
                "--run.wandb_mode",
                "disabled",
                "--data.language",
                str(spec),
                "--run.checkpoint_every_n_steps",
                "2",
                "--trainer.max_steps",
                "4",
            ]
        )
        == 0
    )
    run = root / "tiny"
    assert "helps: .2, finds: .1" in text
    spec.write_text(text.replace("helps: .2, finds: .1", "helps: .1, finds: .2", 1))
    capsys.readouterr()
    assert main(["resume", str(run), "--trainer.max_steps", "6"]) == 2
    assert "language or corpus has changed since it started" in capsys.readouterr().err
    spec.write_text("# a comment added later\n" + text)
    assert main(["resume", str(run), "--trainer.max_steps", "6"]) == 0


def test_save_corpus_maps_strings_and_round_trips(tmp_path):
    """Strings become ids in order of first appearance, 'start' at token 0 stands for the unused
    label, and the file reads back as the same tokens, labels and log-probabilities."""
    sequences = [["the", "cat", "the", "cat"], ["a", "dog", "a", "dog"]]
    labels = [["start", "noun", "copy", "copy"], ["start", "noun", "copy", "copy"]]
    logp = np.log(np.full((2, 4), 0.5))
    path = save_corpus(tmp_path / "c.npz", sequences, labels, logp=logp)
    corpus = load_corpus(path)
    np.testing.assert_array_equal(corpus.tokens, [[0, 1, 0, 1], [2, 3, 2, 3]])
    assert list(corpus.vocab.tokens) == ["the", "cat", "a", "dog"]
    assert corpus.label_names == ["start", "noun", "copy"]
    np.testing.assert_array_equal(corpus.labels[:, 1:], [[1, 2, 2], [1, 2, 2]])
    np.testing.assert_allclose(corpus.logp, logp)
    # ids with the generator's own vocabulary and label names give the same file contents
    again = save_corpus(
        tmp_path / "ids.npz",
        corpus.tokens,
        [[0, 0, 1, 1], [0, 0, 1, 1]],
        token_strings=["the", "cat", "a", "dog"],
        label_names=["noun", "copy"],
    )
    np.testing.assert_array_equal(load_corpus(again).labels, corpus.labels)
    assert list(load_corpus(again).vocab.tokens) == list(corpus.vocab.tokens)


@pytest.mark.parametrize(
    "args,message",
    [
        (dict(sequences=[[1, 2, 3], [1, 2]], labels=[["x"] * 3, ["x"] * 2]), "sequence 1 has 2 entries"),
        (dict(sequences=[[1, 2], [2, 1]], labels=[["x", "start"], ["x", "x"]]), "'start' is reserved"),
        (
            dict(sequences=[["a", "b"], ["b", "z"]], labels=[["x"] * 2] * 2, token_strings=["a", "b"]),
            "sequence 1, token 1: 'z' is not in token_strings",
        ),
        (dict(sequences=[[1, 2], [2, 1]], labels=[[0, 0], [0, 0]]), "label_names: integer labels need"),
        (dict(sequences=[[1, 2], [2, 1]], labels=[["x"] * 3] * 2), "does not match sequences"),
        (
            dict(sequences=[[1, 2], [2, 1]], labels=[["x"] * 2] * 2, logp=[[0.0, 0.5], [0.0, -1.0]]),
            "logp: sequence 0, token 1",
        ),
    ],
)
def test_save_corpus_says_what_is_wrong_and_writes_nothing(tmp_path, args, message):
    with pytest.raises(SpecError, match=message) as error:
        save_corpus(tmp_path / "c.npz", **args)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_save_corpus_never_overwrites_unasked(tmp_path):
    path = save_corpus(tmp_path / "c.npz", [[1, 2], [2, 1]], [["x", "x"], ["x", "y"]])
    before = path.read_bytes()
    with pytest.raises(SpecError, match="already exists"):
        save_corpus(path, [[0, 0], [0, 0]], [["x", "x"], ["x", "x"]])
    assert path.read_bytes() == before


def test_llc_of_a_corpus_run_reads_the_recorded_file_and_refuses_a_changed_one(tmp_path, capsys):
    """The LLC's data pool of a corpus run is the run's own training sequences, read from the file
    the timeline recorded (data-refined per corpus label); a changed file is refused in one line
    and nothing is written."""
    import hashlib
    from pathlib import Path

    import yaml

    from devinterp.llc.snapshots import DataPool
    from devinterp.store.llc_file import load_llc

    path = write_corpus(tmp_path / "c.npz", corpus_arrays(n=40))
    root = tmp_path / "runs"
    fit = ["fit", "--config", str(TINY), "--run.root", str(root), "--run.wandb_mode", "disabled"]
    assert (
        main([*fit, "--data.language", path, "--trainer.max_steps", "4", "--timeline.n_snapshots", "2"]) == 0
    )
    run = root / "tiny"
    llc = ["llc", str(run), "--chains", "2", "--draws", "3", "--pool-size", "16", "--batch-size", "4"]
    assert main(llc + ["--refinements", "model", "bigram"]) == 0
    found = load_llc(run)
    assert sorted(found) == ["bigram", "model"] and np.isfinite(found["model"]["llc"]).all()
    # the pool: training rows only (the run's probe rows held out), cut to the run's seq_len
    config = yaml.safe_load((run / "config.yaml").read_text())
    recorded = {"corpus": path, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
    pool = DataPool.from_run(recorded, config["data"], 16, config["data"]["seq_len"])
    corpus = load_corpus(path)
    corpus.split(config["data"]["probe_size"], config["data"]["probe_seed"])
    held_out = {tuple(row) for row in corpus.tokens[corpus.probe_rows, : config["data"]["seq_len"]]}
    assert pool.tokens.shape == (16, config["data"]["seq_len"])
    assert not held_out & {tuple(row) for row in pool.tokens.tolist()}
    sidecar = (run / "llc.h5").read_bytes()
    write_corpus(tmp_path / "c.npz", corpus_arrays(n=40, seed=9))
    capsys.readouterr()
    assert main(llc + ["--refinements", "model", "bigram", "induction"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the corpus has changed since the run trained on it" in err, err
    assert (run / "llc.h5").read_bytes() == sidecar
