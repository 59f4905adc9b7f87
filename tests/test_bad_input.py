"""Bad input of many distinct kinds: one line naming the field or file, a non-zero exit, no
traceback, and existing run folders untouched (issue: Reliability)."""

import hashlib
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from devinterp.cli.main import main
from devinterp.language import load_language
from tests.conftest import ROOT, SEED_SPEC_PATH

TINY = ROOT / "tests" / "data" / "tiny.yaml"
SEED_TEXT = SEED_SPEC_PATH.read_text()


def spec(tmp, text, name="spec.yaml"):
    path = tmp / name
    path.write_text(text)
    return path


def seed_with(old, new):
    assert old in SEED_TEXT
    return SEED_TEXT.replace(old, new, 1)


def fit(root, *extra, language=SEED_SPEC_PATH):
    return [
        "fit",
        "--config",
        TINY,
        "--run.root",
        root,
        "--run.wandb_mode",
        "disabled",
        "--data.language",
        language,
        *extra,
    ]


def corpus(tmp, change=lambda arrays: None):
    """A corpus file sampled from the seed language (40 x 16), after ``change(arrays)``."""
    language = load_language(SEED_SPEC_PATH)
    sample = language.sample(40, 16, seed=0)
    arrays = {
        "tokens": sample.tokens,
        "labels": np.maximum(sample.labels - 1, 0),
        "logp": sample.logp,
        "label_names": np.array(language.label_names[1:]),
        "token_strings": np.array(language.vocab.tokens),
    }
    change(arrays)
    path = tmp / "corpus.npz"
    np.savez(path, **arrays)
    return path


def damaged_timeline(run, tmp, damage):
    """A copy of the finished run's folder with its timeline damaged by ``damage(path)``."""
    folder = tmp / "copy"
    shutil.copytree(run, folder)
    damage(folder / "timeline.h5")
    return folder


def set_schema(path, version):
    with h5py.File(path, "r+") as f:
        del f["meta/schema_version"]
        f["meta/schema_version"] = version


def drop(path, key):
    with h5py.File(path, "r+") as f:
        del f[key]


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


# (id, build(tmp, root, run) -> argv, what the message must contain)
CASES = [
    # language specs
    (
        "spec-missing",
        lambda t, r, run: fit(r, language=t / "nope.yaml"),
        "nope.yaml: cannot read language spec",
    ),
    (
        "spec-not-yaml",
        lambda t, r, run: fit(r, language=spec(t, "categories: [a, b\n")),
        "spec.yaml: not valid YAML",
    ),
    (
        "spec-not-a-mapping",
        lambda t, r, run: fit(r, language=spec(t, "- a\n- b\n")),
        "spec.yaml: expected a mapping",
    ),
    (
        "spec-python-tag",
        lambda t, r, run: fit(r, language=spec(t, "!!python/object/apply:os.system ['true']\n")),
        "spec.yaml: not valid YAML",
    ),
    (
        "spec-missing-field",
        lambda t, r, run: fit(r, language=spec(t, seed_with("start: {NAME: 1.0}\n", ""))),
        "missing required field 'start'",
    ),
    (
        "spec-unknown-primitive",
        lambda t, r, run: fit(r, language=spec(t, seed_with("type: induction", "type: inducton"))),
        "primitives[0].type: unknown primitive 'inducton'",
    ),
    (
        "spec-probabilities-sum",
        lambda t, r, run: fit(
            r, language=spec(t, seed_with("helps: .2, finds: .1", "helps: .2, finds: .05"))
        ),
        "table.alice: probabilities sum to 0.95, not 1",
    ),
    (
        "spec-negative-probability",
        lambda t, r, run: fit(
            r, language=spec(t, seed_with("VERB: {DET: .7, NAME: .3}", "VERB: {DET: -0.3, NAME: 1.3}"))
        ),
        "negative probability",
    ),
    (
        "spec-unknown-token",
        lambda t, r, run: fit(r, language=spec(t, seed_with("output: at}", "output: zebra}"))),
        "unknown token 'zebra'",
    ),
    (
        "spec-duplicate-token",
        lambda t, r, run: fit(r, language=spec(t, seed_with("DET: [the, a]", "DET: [the, a, the]"))),
        "duplicate token 'the'",
    ),
    (
        "spec-unknown-key",
        lambda t, r, run: fit(r, language=spec(t, seed_with("max_skip: 8", "maxskip: 8"))),
        "unknown key 'maxskip'",
    ),
    # corpora made elsewhere
    (
        "corpus-missing-array",
        lambda t, r, run: fit(r, language=corpus(t, lambda a: a.pop("labels"))),
        "corpus.npz: missing required array 'labels'",
    ),
    (
        "corpus-unknown-array",
        lambda t, r, run: fit(r, language=corpus(t, lambda a: a.update(log_p=a.pop("logp")))),
        "corpus.npz: unknown array 'log_p'",
    ),
    (
        "corpus-label-shape",
        lambda t, r, run: fit(r, language=corpus(t, lambda a: a.update(labels=a["labels"][:, :-1]))),
        "labels: shape (40, 15) does not match tokens (40, 16)",
    ),
    (
        "corpus-label-out-of-range",
        lambda t, r, run: fit(r, language=corpus(t, lambda a: a["labels"].__setitem__((3, 5), 7))),
        "labels: sequence 3, token 5: 7 is out of range (label ids must be below len(label_names))",
    ),
    (
        "corpus-token-beyond-vocab",
        lambda t, r, run: fit(r, language=corpus(t, lambda a: a["tokens"].__setitem__((2, 9), 40))),
        "tokens: sequence 2, token 9: 40 is out of range (token ids must be below the vocabulary size 33)",
    ),
    (
        "corpus-float-tokens",
        lambda t, r, run: fit(r, language=corpus(t, lambda a: a.update(tokens=a["tokens"] * 1.0))),
        "tokens: expected integers, got float64",
    ),
    (
        "corpus-logp-positive",
        lambda t, r, run: fit(r, language=corpus(t, lambda a: a["logp"].__setitem__((0, 4), 0.5))),
        "logp: sequence 0, token 4: 0.5 is not a log-probability",
    ),
    (
        "corpus-object-strings",
        lambda t, r, run: fit(
            r,
            language=corpus(
                t, lambda a: a.update(label_names=np.array(list(a["label_names"]), dtype=object))
            ),
        ),
        "label_names: stored as Python objects",
    ),
    (
        "corpus-reserved-label",
        lambda t, r, run: fit(
            r, language=corpus(t, lambda a: a.update(label_names=np.array(["start", "b", "c", "d"])))
        ),
        "label_names: 'start' is reserved for position 0",
    ),
    (
        "corpus-not-npz",
        lambda t, r, run: fit(r, language=spec(t, "tokens", "corpus.npz")),
        "corpus.npz: not a readable .npz file",
    ),
    (
        "corpus-not-hdf5",
        lambda t, r, run: fit(r, language=spec(t, "tokens", "corpus.h5")),
        "corpus.h5: not a readable HDF5 file",
    ),
    (
        "corpus-seq-len",
        lambda t, r, run: fit(r, "--data.seq_len", "32", language=corpus(t)),
        "data.seq_len: must be between 2 and the corpus's sequence length 16",
    ),
    (
        "corpus-probe-size",
        lambda t, r, run: fit(r, "--data.probe_size", "40", language=corpus(t)),
        "data.probe_size: holding out 40 sequences leaves none of the 40",
    ),
    (
        "corpus-knockout",
        lambda t, r, run: fit(r, "--data.knockout", "[bigram]", language=corpus(t)),
        "is a corpus: it has no primitives to knock out",
    ),
    (
        "spec-window-too-long",
        lambda t, r, run: fit(r, "--data.seq_len", "8"),
        "max_skip: 8 must be below the sequence length 8",
    ),
    (  # options removed with their shims (0.1.0 was never released)
        "removed-timeline-live",
        lambda t, r, run: fit(r, "--timeline.live", "true"),
        "unrecognized arguments: --timeline.live true",
    ),
    (
        "removed-flush-alias",
        lambda t, r, run: fit(r, "--circuits.flush_every_n_steps", "5"),
        "unrecognized arguments: --circuits.flush_every_n_steps 5",
    ),
    # run configs
    (
        "config-missing",
        lambda t, r, run: ["fit", "--config", t / "none.yaml"],
        "none.yaml: cannot read the run config",
    ),
    (
        "config-not-yaml",
        lambda t, r, run: ["fit", "--config", spec(t, "model: [1,\n", "run.yaml")],
        "run.yaml: the run config is not valid YAML (line 2)",
    ),
    (
        "config-unknown-key",
        lambda t, r, run: [
            "fit",
            "--config",
            TINY,
            "--config",
            spec(t, "model:\n  n_layer: 2\n", "run.yaml"),
        ],
        "n_layer",
    ),
    ("config-abbreviated-flag", lambda t, r, run: fit(r, "--model.n_layer", "2"), "--model.n_layer"),
    ("config-wrong-type", lambda t, r, run: fit(r, "--model.lr", "fast"), "model.lr"),
    ("config-unknown-choice", lambda t, r, run: fit(r, "--model.attention", "linear"), "model.attention"),
    (
        "config-zero-layers",
        lambda t, r, run: fit(r, "--model.n_layers", "0"),
        "model.n_layers: must be at least 1, got 0",
    ),
    (
        "config-odd-rope-head",
        lambda t, r, run: fit(r, "--model.d_head", "7"),
        "model.d_head: RoPE needs an even d_head",
    ),
    ("config-negative-lr", lambda t, r, run: fit(r, "--model.lr", "-0.1"), "model.lr: must be above 0"),
    (
        "config-zero-batch",
        lambda t, r, run: fit(r, "--data.batch_size", "0"),
        "data.batch_size: must be at least 1",
    ),
    (
        "config-zero-flush",
        lambda t, r, run: fit(r, "--timeline.flush_every_n_steps", "0"),
        "timeline.flush_every_n_steps",
    ),
    (
        "config-zero-probe-cadence",
        lambda t, r, run: fit(r, "--probe.every_n_steps", "0"),
        "probe.every_n_steps",
    ),
    (
        "config-knockout-unknown",
        lambda t, r, run: fit(r, "--data.knockout", "[trigram]"),
        "cannot knock out 'trigram'",
    ),
    (
        "config-knockout-fallback",
        lambda t, r, run: fit(r, "--data.knockout", "[category]"),
        "cannot knock out 'category'",
    ),
    ("config-max-steps-text", lambda t, r, run: fit(r, "--trainer.max_steps", "many"), "trainer.max_steps"),
    # folders and checkpoints
    (
        "root-under-a-file",
        lambda t, r, run: fit(spec(t, "x", "plain-file") / "runs"),
        "cannot write the run folder",
    ),
    ("resume-missing-folder", lambda t, r, run: ["resume", t / "gone"], "gone: no such run folder"),
    ("resume-not-a-run", lambda t, r, run: ["resume", t], "not a run folder (no config.yaml)"),
    ("resume-finished", lambda t, r, run: ["resume", run], "the run already finished"),
    (
        "resume-damaged-checkpoint",
        lambda t, r, run: ["resume", damaged_checkpoint(run, t)],
        "last.ckpt: not a readable checkpoint",
    ),
    (
        "resume-pickled-checkpoint",
        lambda t, r, run: ["resume", pickled_checkpoint(run, t)],
        "last.ckpt: not a readable checkpoint",
    ),
    # command line
    ("unknown-subcommand", lambda t, r, run: ["fitt"], "'fitt' is not a command; one of: fit"),
    ("unknown-flag", lambda t, r, run: fit(r, "--bogus", "1"), "--bogus"),
    (
        "language-unknown-command",
        lambda t, r, run: ["language", "draw", SEED_SPEC_PATH],
        "invalid choice: 'draw'",
    ),
    (
        "language-bad-number",
        lambda t, r, run: ["language", "show", SEED_SPEC_PATH, "--n", "three"],
        "--n: invalid int value",
    ),
    (
        "language-spec-missing",
        lambda t, r, run: ["language", "show", t / "nope.yaml"],
        "nope.yaml: cannot read language spec",
    ),
    (
        "dependence-unknown-primitive",
        lambda t, r, run: [
            "dependence",
            "--config",
            TINY,
            "--primitives",
            "trigram",
            "--root",
            t,
            "--",
            "--data.language",
            SEED_SPEC_PATH,
        ],
        "--primitives: 'trigram' is not a primitive",
    ),
    (
        "dependence-on-a-corpus",
        lambda t, r, run: [
            "dependence",
            "--config",
            TINY,
            "--primitives",
            "bigram",
            "--root",
            t,
            "--",
            "--data.language",
            corpus(t),
        ],
        "corpus.npz is a corpus",
    ),
    (
        "analyze-serve-threshold",
        lambda t, r, run: ["analyze", run, "--out", t / "out", "--serve-threshold", "0"],
        "--serve-threshold: must be in (0, 1]",
    ),
    (
        "analyze-level",
        lambda t, r, run: ["analyze", run, "--out", t / "out", "--level", "2"],
        "--level: must be between 0 and 1",
    ),
    (
        "analyze-max-states",
        lambda t, r, run: ["analyze", run, "--out", t / "out", "--max-states", "0"],
        "--max-states: must be at least 1, got 0",
    ),
    (
        "analyze-stage-bins",
        lambda t, r, run: ["analyze", run, "--out", t / "out", "--stage-bins", "2"],
        "--stage-bins: must be at least 4, got 2",
    ),
    ("analyze-missing-path", lambda t, r, run: ["analyze", t / "nothing", "--out", t / "out"], "nothing"),
    # timeline files
    (
        "timeline-not-hdf5",
        lambda t, r, run: [
            "analyze",
            damaged_timeline(run, t, lambda p: p.write_text("not hdf5")),
            "--out",
            t / "out",
        ],
        "timeline.h5: not a readable HDF5 file",
    ),
    (
        "timeline-truncated",
        lambda t, r, run: ["analyze", damaged_timeline(run, t, truncate), "--out", t / "out"],
        "timeline.h5",
    ),
    (
        "timeline-no-meta",
        lambda t, r, run: [
            "analyze",
            damaged_timeline(run, t, lambda p: drop(p, "meta")),
            "--out",
            t / "out",
        ],
        "timeline.h5: not a timeline (no meta/schema_version)",
    ),
    (
        "timeline-future-schema",
        lambda t, r, run: [
            "analyze",
            damaged_timeline(run, t, lambda p: set_schema(p, "99")),
            "--out",
            t / "out",
        ],
        "unknown timeline schema version '99'",
    ),
    (
        "timeline-schema-1",  # its read path was removed (no file of it was left to test it on)
        lambda t, r, run: [
            "analyze",
            damaged_timeline(run, t, lambda p: set_schema(p, "1")),
            "--out",
            t / "out",
        ],
        "unknown timeline schema version '1' (this version reads [2, 3])",
    ),
    (
        "timeline-missing-dataset",
        lambda t, r, run: [
            "analyze",
            damaged_timeline(run, t, lambda p: drop(p, "probe/committed")),
            "--out",
            t / "out",
        ],
        "group 'probe' has no 'committed'",
    ),
    (
        "intervention-unknown-metric",
        lambda t, r, run: fit(
            r, "--mechanism.interventions", '[{kind: penalty, metric: "mechanism/L0H*/nope", weight: 1}]'
        ),
        "mechanism.interventions[0].metric: 'mechanism/L0H*/nope' matches no metric",
    ),
    (
        "intervention-no-such-head",
        lambda t, r, run: fit(r, "--mechanism.interventions", "[{kind: clamp, component: L0H7}]"),
        "mechanism.interventions[0].component: 'L0H7' names no component",
    ),
    (
        "intervention-window-backwards",
        lambda t, r, run: fit(
            r, "--mechanism.interventions", "[{kind: clamp, component: L0H1, from_step: 4, to_step: 2}]"
        ),
        "mechanism.interventions[0].to_step: must be after from_step (4)",
    ),
    (
        "intervention-negative-weight",
        lambda t, r, run: fit(
            r, "--mechanism.interventions", '[{kind: penalty, metric: "bigram/*/kl", weight: -2}]'
        ),
        "promotes the metric; say so with promote: true",
    ),
    (
        "dependence-mechanisms-file",
        lambda t, r, run: [
            "dependence",
            "--config",
            TINY,
            "--mechanisms",
            spec(t, "no-prev: [{kind: penalty, weight: 1}]", "mechanisms.yaml"),
            "--root",
            t,
        ],
        "mechanisms.yaml: no-prev[0].metric: a penalty needs the metric",
    ),
]


def damaged_checkpoint(run, tmp):
    folder = tmp / "damaged"
    shutil.copytree(run, folder)
    last = folder / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    return folder


class Payload:
    pass


def pickled_checkpoint(run, tmp):
    """A checkpoint that would run code if unpickled: weights_only loading refuses it."""
    folder = tmp / "pickled"
    shutil.copytree(run, folder)
    torch.save({"global_step": 1, "payload": Payload()}, folder / "checkpoints" / "last.ckpt")
    return folder


def fingerprint(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert (
        main([str(a) for a in fit(root, "--trainer.max_steps", "4", "--run.checkpoint_every_n_steps", "2")])
        == 0
    )
    return root, root / "tiny"


def test_cases_are_many_and_distinct():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,build,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_named_line_and_touches_no_run(
    tmp_path, capsys, finished_run, name, build, message
):
    root, run = finished_run
    before = fingerprint(root)
    argv = [str(a) for a in build(tmp_path, root, run)]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith("devinterp: error: "), err
    assert message in lines[0]
    assert fingerprint(root) == before  # the finished run, and nothing new beside it


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    """The process boundary: exit code and stderr of a real command."""
    result = subprocess.run(
        [sys.executable, "-m", "devinterp", *map(str, fit(tmp_path, "--model.n_heads", "0"))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "devinterp: error: model.n_heads: must be at least 1, got 0"
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def limited_fit(tmp_path, file_size_limit, *extra):
    """A real `devinterp fit` whose files may not grow past ``file_size_limit`` bytes: a full disk
    (the tests run as root, where permissions do not stop writes)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, "-m", "devinterp", *map(str, fit(tmp_path / "runs", *extra))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )


@pytest.mark.parametrize(
    "limit,max_steps,message",
    [
        (
            1024,
            5,
            "cannot write the run folder (File too large)",
        ),  # the first write: the run folder, before training
        (256 * 1024, 100_000, "but the file-size limit (ulimit -f) is 0.2 MiB"),  # the timeline will not fit
    ],
)
def test_full_disk_fails_before_training(tmp_path, limit, max_steps, message):
    result = limited_fit(tmp_path, limit, "--trainer.max_steps", max_steps)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[-1]] and errors[-1].startswith("devinterp: error: ") and message in errors[-1]
    assert "Traceback" not in result.stderr and "Excess loss" not in result.stdout  # no step was trained
    assert not list((tmp_path / "runs").rglob("timeline.h5"))


def test_sources_load_nothing_unsafely():
    """No pickle anywhere: YAML through safe_load, checkpoints through weights_only."""
    import re

    offending = []
    for folder in ("devinterp", "callbacks", "analysis", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                unsafe = re.search(
                    r"\bimport pickle|\bpickle\.|allow_pickle=True|yaml\.(unsafe_)?load\(|"
                    r"yaml\.Loader|yaml\.FullLoader",
                    line,
                ) or ("torch.load(" in line and "weights_only=True" not in line)
                if unsafe:
                    offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offending, offending
