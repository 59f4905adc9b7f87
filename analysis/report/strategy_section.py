"""The strategies section: the strategy curves of every primitive that declares strategies, shaded
by the closest one (Edelman et al., NeurIPS 2024, Fig. 1), the phases each unit went through and
the switches between them; and the language-variant table (runs of another language, paired by
seed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.report.pipeline import Analysis  # noqa: E402
from analysis.report.text import shift_text  # noqa: E402
from analysis.strategies import (  # noqa: E402
    closest,
    phases,
    primitives_with_strategies,
    strategy_curves,
    strategy_path,
    switch_name,
)
from devinterp.restore import run_language, snapshot_model  # noqa: E402
from devinterp.store.timeline import Timeline  # noqa: E402

BUCKET_SEQUENCES, BUCKET_SEED = 256, 271_828  # fresh sequences for the by-position table


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """Predicted positions 1 .. seq_len - 1 cut at a tenth, a quarter and a half of the sequence."""
    cuts = sorted({1, *(max(2, round(seq_len * f)) for f in (0.1, 0.25, 0.5)), seq_len})
    return [(a, b - 1) for a, b in zip(cuts, cuts[1:]) if b > a]


def kl_by_position(timeline: Timeline, primitive: str) -> tuple[int, list[tuple[int, int]], np.ndarray, dict]:
    """(step, buckets, model KL (bucket, member), strategy -> KL (bucket,)): KL(truth || .) on the
    primitive's positions of fresh sequences, per bucket of predicted positions, for the model at
    the last weight snapshot and for each strategy the primitive declares."""
    import torch

    language = run_language(timeline)
    model, step = snapshot_model(timeline, len(timeline.snapshot_steps) - 1)
    seq_len = model.cfg.n_ctx
    sample = language.sample(BUCKET_SEQUENCES, seq_len, BUCKET_SEED)
    truth = language.true_next_dist(sample.tokens)[:, :-1]  # (n, T-1, V)
    mine = sample.labels[:, 1:] == language.label_names.index(primitive)  # (n, T-1)
    with torch.no_grad():
        tokens = torch.from_numpy(sample.tokens[:, :-1])[None].expand(model.cfg.n_members, -1, -1)
        log_q = model(tokens).double().log_softmax(-1).numpy()  # (M, n, T-1, V)

    plogp = (truth * np.log(np.where(truth > 0, truth, 1.0))).sum(-1)  # (n, T-1)

    def kl(log_prediction: np.ndarray) -> np.ndarray:  # (..., n, T-1, V) -> (..., n, T-1)
        return plogp - (truth * log_prediction).sum(-1)

    buckets = position_buckets(seq_len)
    strategies = language.primitives[language.label_names.index(primitive) - 1].strategies(sample.tokens)
    model_kl = kl(log_q)
    rows, by_strategy = [], {name: [] for name in strategies}
    for first, last in buckets:  # predicted positions first..last are rows first-1..last-1
        where = mine.copy()
        where[:, : first - 1] = False
        where[:, last:] = False
        rows.append([model_kl[m][where].mean() for m in range(model_kl.shape[0])])
        for name, prediction in strategies.items():
            by_strategy[name].append(kl(np.log(np.maximum(prediction[:, :-1], 1e-300)))[where].mean())
    return step, buckets, np.array(rows), {k: np.array(v) for k, v in by_strategy.items()}


def strategy_figure(curves, out: Path) -> Path:
    """Every strategy's KL(strategy || model), median over members, against the step; the
    background shaded by the closest strategy of the paper's path (uniform, then the primitive's
    own), on the same smoothed grid the switches use."""
    path = strategy_path(curves)
    colours = dict(zip(path, plt.cm.tab10.colors))
    grey = iter(plt.cm.Greys(np.linspace(0.45, 0.75, len(curves.names))))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    x = curves.steps + 1
    for name in curves.names:
        median = np.median(curves.of(name), axis=1)
        style = (
            {"color": colours[name], "lw": 2}
            if name in colours
            else {"color": next(grey), "lw": 1, "ls": "--"}
        )
        ax.plot(x, median, label=name, **style)
    grid_steps, best = closest(curves, path)
    winner = np.array([np.bincount(row, minlength=len(path)).argmax() for row in best])  # most members
    edges = np.r_[grid_steps[0], (grid_steps[1:] + grid_steps[:-1]) / 2, grid_steps[-1]] + 1
    for i, index in enumerate(winner):
        ax.axvspan(edges[i], edges[i + 1], color=colours[path[index]], alpha=0.12, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("step + 1")
    ax.set_ylabel("KL(strategy || model), nats")
    ax.set_title(f"{curves.primitive}: distance to each strategy (median of {curves.kl.shape[2]} members)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    target = out / f"strategies_{curves.primitive}.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def strategy_section(result: Analysis, full: list[Timeline], out: Path) -> tuple[list[str], list[Path]]:
    """Lines and figures; nothing for runs whose primitives declare no strategies."""
    primitives = primitives_with_strategies(full[0])
    if not primitives:
        return [], []
    lines = [
        "## Strategies",
        "",
        "KL(strategy || model) on each primitive's probe positions (devinterp/strategies.py). A switch "
        "S > S' is the first step after which S' stays closer to the model than S (the difference "
        "binned in log-step and smoothed as onsets are; censored at the last step otherwise).",
        "",
    ]
    figures = []
    for primitive in primitives:
        per_run = [strategy_curves(t, primitive) for t in full]
        figures.append(strategy_figure(per_run[0], out))
        path = strategy_path(per_run[0])
        sequences = [" > ".join(s) for curves in per_run for s in phases(curves, path)]
        counts = {s: sequences.count(s) for s in dict.fromkeys(sequences)}
        lines.append(
            f"**{primitive}**: the closest of {', '.join(path)}, in the order each unit held it: "
            + "; ".join(f"{s} in {n} of {len(sequences)}" for s, n in counts.items())
            + "."
        )
        lines += ["", "| switch | units | median step [IQR] | never (censored) |", "|---|---|---|---|"]
        for i, before in enumerate(path):
            for after in path[i + 1 :]:
                onsets = result.switches.get(switch_name(primitive, before, after), [])
                steps = [o.step for o in onsets if not o.censored]
                spread = (
                    f"{np.median(steps):.0f} [{np.percentile(steps, 25):.0f}, {np.percentile(steps, 75):.0f}]"
                    if steps
                    else "-"
                )
                lines.append(
                    f"| {before} > {after} | {len(onsets)} | {spread} | {len(onsets) - len(steps)} |"
                )
        lines.append("")
        if len(full[0].snapshot_steps):
            lines += position_lines(full[0], primitive)
    return lines, figures


def position_lines(timeline: Timeline, primitive: str) -> list[str]:
    """The by-position table of ``kl_by_position``."""
    step, buckets, model_kl, strategies = kl_by_position(timeline, primitive)
    head = " | ".join(f"pos {a}-{b}" for a, b in buckets)
    lines = [
        f"KL(truth || .) on {primitive}'s positions by predicted position, on {BUCKET_SEQUENCES} fresh "
        f"sequences, for the model at step {step} (median [min, max] over members) and for each strategy:",
        "",
        f"| predictor | {head} |",
        "|---|" + "---|" * len(buckets),
        "| model | "
        + " | ".join(f"{np.median(r):.4f} [{r.min():.4f}, {r.max():.4f}]" for r in model_kl)
        + " |",
    ]
    lines += [
        f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + " |" for name, values in strategies.items()
    ]
    return lines + [""]


def language_lines(result: Analysis) -> list[str]:
    """The table of events shifted in runs of another language; nothing without such runs."""
    if not result.languages:
        return []
    lines = [
        "## Other languages (paired by seed)",
        "",
        f"Runs of {', '.join(result.other_languages)} against the runs of the first language: the onset "
        "shift of each event both have (a primitive's onset on its own language's yardstick, or a "
        "strategy switch), other minus first, in log(step + 1), median over members paired by seed "
        "and index (> 0: later in the other language), with a 95% bootstrap interval and a Wilcoxon p.",
        "",
        "| language | event | shift [95% CI], blocked |",
        "|---|---|---|",
    ]
    lines += [f"| {s.language} | {s.event} | {shift_text(s.shift)} |" for s in result.languages]
    return lines + [""]
