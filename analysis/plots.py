"""Figures a researcher would put in a paper (matplotlib, PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.onset import Onset  # noqa: E402


def plot_progress(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    onsets: dict[str, list[Onset]],
    path: Path,
    title: str,
    baseline: str = "nothing learned",
) -> Path:
    """Progress per primitive against log-step: each member thin, the median bold, onsets as
    ticks (censored onsets as open circles at the last step). Progress below 0 (not yet as good
    as the baseline) is drawn, down to -1."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, (steps, progress)) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        x = steps + 1
        ax.plot(x, progress, color=color, alpha=0.25, linewidth=0.7)
        ax.plot(x, np.median(progress, axis=1), color=color, linewidth=2.2, label=name)
        for onset in onsets.get(name, []):
            marker = "o" if onset.censored else "|"
            ax.plot(
                onset.step + 1,
                0.5 if not onset.censored else 1.02,
                marker=marker,
                color=color,
                markersize=8,
                markerfacecolor="none" if onset.censored else color,
            )
    ax.axhline(0.0, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("step + 1")
    ax.set_ylabel("progress (1 = learned)")
    lowest = min((float(np.nanmin(np.median(p, axis=1))) for _, p in curves.values()), default=0.0)
    ax.set_ylim(max(-1.0, min(0.0, lowest)) - 0.05, 1.06)
    fig.text(0.01, 0.01, f"0 = {baseline}", fontsize=6, color="grey")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_weight_vs_probe(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: Path) -> Path:
    """One panel per primitive: weight-derived and probe progress (medians over members)."""
    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for source, style in (("weight", "-"), ("probe", "--")):
            if source in curves[name]:
                steps, progress = curves[name][source]
                ax.plot(steps + 1, np.median(progress, axis=1), style, label=source)
        ax.set_xscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step + 1")
    axes[0][0].set_ylabel("progress (median of members)")
    axes[0][0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_dag(nodes: list[str], edges: list[tuple[str, str]], path: Path) -> Path:
    """The ordering DAG, left to right by longest path from a source."""
    depth = {n: 0 for n in nodes}
    for _ in nodes:  # longest-path layering (the graph is acyclic)
        for a, b in edges:
            depth[b] = max(depth[b], depth[a] + 1)
    layers: dict[int, list[str]] = {}
    for n in nodes:
        layers.setdefault(depth[n], []).append(n)
    position = {n: (d, i - (len(layer) - 1) / 2) for d, layer in layers.items() for i, n in enumerate(layer)}
    fig, ax = plt.subplots(
        figsize=(2.2 * (max(layers) + 1) + 1, 1.2 * max(len(v) for v in layers.values()) + 1)
    )
    half_width = lambda name: 3.6 * len(name) + 10  # noqa: E731  (points: keep heads outside the boxes)
    for a, b in edges:
        ax.annotate(
            "",
            xy=position[b],
            xytext=position[a],
            arrowprops=dict(arrowstyle="-|>", color="0.3", shrinkA=half_width(a), shrinkB=half_width(b)),
        )
    for n, (x, y) in position.items():
        ax.text(x, y, n, ha="center", va="center", bbox=dict(boxstyle="round", fc="white", ec="0.3"))
    ax.set_xlim(-0.7, max(layers) + 0.7)
    ax.set_ylim(min(y for _, y in position.values()) - 0.8, max(y for _, y in position.values()) + 0.8)
    ax.axis("off")
    ax.set_title("learned before (arrows: significant, transitive reduction)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_direct_path(
    direct: np.ndarray,
    tokens: list[str],
    token_category: np.ndarray,
    categories: list[str],
    step: int,
    path: Path,
) -> Path:
    """W_E W_U [current, next] as a heatmap with category blocks (the proposal's figure)."""
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    limit = float(np.abs(direct).max()) or 1.0
    image = ax.imshow(direct, cmap="RdBu_r", vmin=-limit, vmax=limit)
    boundaries = np.flatnonzero(np.diff(token_category)) + 0.5
    for b in boundaries:
        ax.axhline(b, color="0.2", linewidth=0.6)
        ax.axvline(b, color="0.2", linewidth=0.6)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
    ax.set_xlabel("next token")
    ax.set_ylabel("current token")
    ax.set_title(f"direct path W_E W_U at step {step} (member 0)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_qk_slices(
    slices: dict[str, np.ndarray],
    rows: list[str],
    columns: list[str],
    step: int,
    path: Path,
    title: str = "",
    query_role: str = "query",
    key_role: str = "key",
) -> Path:
    """A primitive's QK slice: the pattern (summed over heads, averaged over its offsets) from
    its query tokens (rows) to its key tokens (columns), one panel per layer."""
    fig, axes = plt.subplots(
        1, len(slices), figsize=(3.8 * len(slices), 3.4 + 0.3 * bool(title)), squeeze=False
    )
    if title:
        fig.suptitle(title, fontsize=9)
    for ax, (panel, matrix) in zip(axes[0], slices.items()):
        limit = float(np.abs(matrix).max()) or 1.0
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlabel(f"key ({key_role})")
        ax.set_ylabel(f"query ({query_role})")
        ax.set_title(f"{panel}, step {step}", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
