"""``devinterp language show SPEC``: read a language rule by rule (or a corpus made elsewhere,
label by label) before training on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from devinterp.baselines import probe_baselines
from devinterp.errors import ArgumentParser
from devinterp.language import Language, load_language, plogp
from devinterp.language.corpus import is_corpus_path, load_corpus
from devinterp.store.schema import UNMEASURABLE

SHORT = {"start": "^"}


def label_share_and_entropy(language: Language, n: int, seq_len: int, seed: int):
    """Share of predicted positions each label covers, and the exact entropy (nats) of the
    next token there: the Bayes-optimal loss per primitive."""
    sample = language.sample(n, seq_len, seed=seed)
    true_next = language.true_next_dist(sample.tokens)[:, :-1]  # (n, T-1, V)
    entropy = -plogp(true_next)
    labels = sample.labels[:, 1:]
    rows = []
    for i, name in enumerate(language.label_names[1:], start=1):
        mask = labels == i
        rows.append((name, mask.mean(), entropy[mask].mean() if mask.any() else float("nan")))
    return rows, entropy.mean()


def render_sequence(language: Language, tokens: np.ndarray, labels: np.ndarray, width: int = 96) -> str:
    """Tokens over their labels, in aligned columns, wrapped at ``width`` characters."""
    words = language.decode(tokens)
    tags = [language.label_names[i] for i in labels.tolist()]
    lines, top, bottom = [], "", ""
    for word, tag in zip(words, tags):
        cell = max(len(word), len(tag)) + 2
        if len(top) + cell > width:
            lines += [top.rstrip(), bottom.rstrip(), ""]
            top, bottom = "", ""
        top += word.ljust(cell)
        bottom += tag.ljust(cell)
    lines += [top.rstrip(), bottom.rstrip()]
    return "\n".join(lines)


def show(spec: str, n_sequences: int, seq_len: int, seed: int, n_stats: int) -> str:
    language = load_language(spec)
    language.check_sequence_length(seq_len)
    out = [
        f"language {language.name!r}: {language.d_vocab} tokens in {len(language.vocab.categories)} "
        f"categories; priority: {' > '.join(p.name for p in language.primitives)}",
        "",
    ]
    sample = language.sample(max(n_sequences, 1), seq_len, seed=seed)
    for k in range(n_sequences):
        out += [
            f"sequence {k} (each token over the rule that produced it)",
            render_sequence(language, sample.tokens[k], sample.labels[k]),
            "",
        ]
    rows, total = label_share_and_entropy(language, n_stats, seq_len, seed + 1)
    out.append(f"over {n_stats} sequences of {seq_len} tokens (predicted positions 1..{seq_len - 1}):")
    out.append(f"{'primitive':<14}{'positions':>10}{'Bayes-optimal loss (nats)':>28}")
    for name, share, entropy in rows:
        out.append(f"{name:<14}{share:>10.1%}{entropy:>28.4f}")
    out.append(f"{'all':<14}{1:>10.0%}{total:>28.4f}")
    out += ["", *blind_table(language, min(n_stats, 512), seq_len, seed + 2)]
    return "\n".join(out)


def blind_table(language: Language, n: int, seq_len: int, seed: int) -> list[str]:
    """Each primitive's baselines over its positions in ``n`` sequences (devinterp/baselines.py):
    mean KL(true || baseline) for uniform, the knock-out and the blind pool, the pool's
    components, and whether the primitive is measurable on the blind yardstick."""
    sample = language.sample(n, seq_len, seed=seed)
    true_next = language.true_next_dist(sample.tokens)[:, :-1]
    by_label, _ = probe_baselines(
        language,
        language.context_oracles(seq_len),
        sample.tokens,
        true_next,
        sample.labels[:, 1:],
        sample.rules[:, 1:],
    )
    V = language.d_vocab
    uniform_kl = plogp(true_next) + np.log(V)  # (n, T-1): KL(true || uniform) at each position
    labels = sample.labels[:, 1:]
    lines = [
        f'baselines over {n} sequences: mean KL (nats) of what means "nothing learned" '
        "(devinterp analyze --yardstick; blind is the default)",
        f"{'primitive':<14}{'uniform':>9}{'knock-out':>11}{'blind':>8}{'blind/uniform':>15}  blind pool",
    ]
    unmeasurable = []
    for index, name in enumerate(language.label_names[1:], start=1):
        if index not in by_label:
            lines.append(f"{name:<14}{'no positions':>28}")
            continue
        found, uniform = by_label[index], float(uniform_kl[labels == index].mean())
        ratio = found.blind / uniform if uniform > 0 else float("nan")
        knock_out = "-" if np.isnan(found.knock_out) else f"{found.knock_out:.3f}"
        flag = "" if ratio > UNMEASURABLE else "  UNMEASURABLE"
        row = f"{name:<14}{uniform:>9.3f}{knock_out:>11}{found.blind:>8.3f}{ratio:>15.2f}"
        lines.append(f"{row}  {found.blind_from}{flag}")
        if flag:
            unmeasurable.append(name)
    lines.append(
        "order<k>: p(next | the last k tokens) of the whole language, the best a model that reads "
        "only them can do; a primitive's pool holds the orders its type admits."
    )
    for name in unmeasurable:
        lines.append(
            f"unmeasurable: {name}: a model that cannot implement it gets within {UNMEASURABLE:.0%} of "
            "the truth over uniform; its progress is NaN on the blind yardstick (change the spec so it "
            "needs its own mechanism)"
        )
    return lines


def show_corpus(path: str, n_sequences: int, seq_len: int) -> str:
    """A corpus made elsewhere: its first sequences with their labels, each label's share of the
    predicted positions and, with logp, the generator's mean loss there (-log p)."""
    corpus = load_corpus(path)
    seq_len = min(seq_len, corpus.tokens.shape[1])
    N, T = corpus.tokens.shape
    out = [
        f"corpus {corpus.name!r}: {N} sequences of {T} tokens, {corpus.d_vocab} tokens, labels: "
        f"{', '.join(corpus.label_names[1:])}; logp: {'yes' if corpus.has_logp else 'no'}",
        "",
    ]
    for k in range(min(n_sequences, N)):
        out += [
            f"sequence {k} (each token over its label)",
            render_sequence(corpus, corpus.tokens[k, :seq_len], corpus.labels[k, :seq_len]),
            "",
        ]
    labels = corpus.labels[:, 1:]
    loss = -corpus.logp[:, 1:] if corpus.has_logp else np.full(labels.shape, np.nan)
    out.append(f"over all {N} sequences (predicted positions 1..{T - 1}):")
    out.append(f"{'label':<14}{'positions':>10}{'generator loss (nats)':>24}")
    for i, name in enumerate(corpus.label_names[1:], start=1):
        mask = labels == i
        out.append(
            f"{name:<14}{mask.mean():>10.1%}{loss[mask].mean() if mask.any() else float('nan'):>24.4f}"
        )
    out.append(f"{'all':<14}{1:>10.0%}{loss.mean():>24.4f}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="devinterp language", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("show", help="sample sequences with each token's rule, shares and Bayes losses")
    p.add_argument("spec", help="language spec (YAML), or a corpus made elsewhere (.npz, .h5)")
    p.add_argument("--n", type=int, default=3, help="sequences to print")
    p.add_argument(
        "--seq-len", type=int, default=64, help="tokens per sequence (the quickstart's data.seq_len)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-stats", type=int, default=2000, help="sequences behind the statistics")
    fit = sub.add_parser("fit-text", help="estimate a spec from a whitespace-tokenised text file")
    fit.add_argument("text", help="the text file")
    fit.add_argument(
        "--vocab", type=int, default=100, help="most frequent tokens kept; the rest become <unk>"
    )
    fit.add_argument("--out", default=None, help="spec to write (default: <text stem>.yaml beside the text)")
    args = parser.parse_args(argv)
    if args.command == "fit-text":
        from devinterp.language.fit_text import fit_text_file

        text = Path(args.text)
        out = fit_text_file(text, Path(args.out) if args.out else text.with_suffix(".yaml"), args.vocab)
        print(f"spec: {out}")
        return 0
    if is_corpus_path(args.spec):
        print(show_corpus(args.spec, args.n, args.seq_len))
        return 0
    print(show(args.spec, args.n, args.seq_len, args.seed, args.n_stats))
    return 0
