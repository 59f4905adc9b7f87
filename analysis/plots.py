"""Figures a researcher would put in a paper (matplotlib, PNG, headless)."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors  # noqa: E402
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

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
    n = len(curves)
    for i, (name, (steps, progress)) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        x = steps + 1
        low, high = np.percentile(progress, [25, 75], axis=1)
        ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)  # members' IQR
        ax.plot(x, progress, color=color, alpha=0.2, linewidth=0.5)
        ax.plot(x, np.median(progress, axis=1), color=color, linewidth=2.2, label=name)
        row = 0.5 + 0.05 * (i - (n - 1) / 2)  # each primitive's onset ticks on their own row near 0.5
        for onset in onsets.get(name, []):
            marker = "o" if onset.censored else "|"
            ax.plot(
                onset.step + 1,
                row if not onset.censored else 1.02,
                marker=marker,
                color=color,
                markersize=7,
                markerfacecolor="none" if onset.censored else color,
            )
    ax.axhline(0.0, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("step + 1")
    ax.set_ylabel("progress (1 = learned)")
    ax.set_ylim(*_progress_limits(curves))
    fig.text(0.01, 0.01, f"0 = {baseline}", fontsize=6, color="grey")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8, title="median, members' IQR; | = a member's onset", title_fontsize=7)
    return _save(fig, path)


def plot_weight_vs_probe(
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: Path, baseline: str = "nothing learned"
) -> Path:
    """One panel per primitive: weight-derived and probe progress, the median over members bold
    and their interquartile range shaded, a legend in every panel."""
    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.3), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for source, style, color in (("weight", "-", "C0"), ("probe", "--", "C1")):
            if source in curves[name]:
                steps, progress = curves[name][source]
                low, high = np.percentile(progress, [25, 75], axis=1)
                ax.fill_between(steps + 1, low, high, color=color, alpha=0.18, linewidth=0)
                ax.plot(
                    steps + 1,
                    np.median(progress, axis=1),
                    style,
                    color=color,
                    label=f"{source} (median, IQR)",
                )
        ax.axhline(0.0, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xscale("log")
        ax.set_ylim(-1.05, 1.08)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step + 1")
        ax.legend(frameon=False, fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("progress (1 = learned)")
    fig.suptitle("weight-derived and probe progress per primitive", fontsize=10)
    fig.text(0.01, 0.01, f"0 = {baseline}", fontsize=6, color="grey")
    return _save(fig, path)


def plot_dag(
    nodes: list[str],
    edges: list[tuple[str, str]],
    path: Path,
    labels: dict[tuple[str, str], str] | None = None,
) -> Path:
    """The ordering DAG, left to right by longest path from a source; ``labels`` are written on
    the arrows (e.g. "16/16 first, Holm p 0.003")."""
    labels = labels or {}
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
        if (a, b) in labels:
            (xa, ya), (xb, yb) = position[a], position[b]
            ax.text(
                (xa + xb) / 2, (ya + yb) / 2 + 0.12, labels[a, b], ha="center", fontsize=6.5, color="0.25"
            )
    for n, (x, y) in position.items():
        ax.text(x, y, n, ha="center", va="center", bbox=dict(boxstyle="round", fc="white", ec="0.3"))
    ax.set_xlim(-0.7, max(layers) + 0.7)
    ax.set_ylim(min(y for _, y in position.values()) - 0.8, max(y for _, y in position.values()) + 0.8)
    ax.axis("off")
    if not edges:
        ax.text(
            (max(layers)) / 2,
            min(y for _, y in position.values()) - 0.55,
            "no significant order (see the report's power line)",
            ha="center",
            fontsize=8,
            color="0.3",
        )
    ax.set_title("learned before: significant orders,\ntransitive reduction", fontsize=9)
    return _save(fig, path)


def plot_direct_path(
    direct: np.ndarray,
    tokens: list[str],
    token_category: np.ndarray,
    categories: list[str],
    step: int,
    path: Path,
    limit: float | None = None,
    member: int = 0,
) -> Path:
    """W_E W_U [current, next] as a heatmap with category blocks named on both axes (the
    proposal's figure); ``limit`` fixes the colour scale (one scale across a run's steps)."""
    fig, ax = plt.subplots(figsize=(8.0, 7.0))
    limit = limit or float(np.abs(direct).max()) or 1.0
    image = ax.imshow(direct, cmap="RdBu_r", vmin=-limit, vmax=limit)
    starts = np.r_[0, np.flatnonzero(np.diff(token_category)) + 1]
    ends = np.r_[starts[1:], len(token_category)]
    for begin, end in zip(starts, ends):  # the category of each block, above and right of the map
        name = categories[int(token_category[begin])]
        ax.text((begin + end - 1) / 2, -1.0, name, ha="center", va="bottom", fontsize=7, color="0.25")
        ax.text(
            len(tokens) - 0.2, (begin + end - 1) / 2, name, ha="left", va="center", fontsize=7, color="0.25"
        )
    boundaries = np.flatnonzero(np.diff(token_category)) + 0.5
    for b in boundaries:
        ax.axhline(b, color="0.2", linewidth=0.6)
        ax.axvline(b, color="0.2", linewidth=0.6)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
    ax.set_xlabel("next token")
    ax.set_ylabel("current token")
    ax.set_title(f"direct path W_E W_U at step {step}, member {member}", pad=22)
    bar = fig.colorbar(image, ax=ax, shrink=0.8, pad=0.12)
    bar.set_label("direct-path logit (same scale at every step)")
    return _save(fig, path)


def plot_qk_slices(
    slices: dict[str, np.ndarray],
    rows: list[str],
    columns: list[str],
    step: int,
    path: Path,
    title: str = "",
    query_role: str = "query",
    key_role: str = "key",
    limit: float | None = None,
) -> Path:
    """A primitive's QK slice: the pattern (summed over heads, averaged over its offsets) from
    its query tokens (rows) to its key tokens (columns), one panel per layer, all panels on one
    colour scale (``limit``: the same across a run's steps)."""
    limit = limit or max(float(np.abs(m).max()) for m in slices.values()) or 1.0
    fig, axes = plt.subplots(
        1, len(slices), figsize=(3.8 * len(slices), 3.4 + 0.3 * bool(title)), squeeze=False
    )
    if title:
        fig.suptitle(title, fontsize=9)
    for ax, (panel, matrix) in zip(axes[0], slices.items()):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlabel(f"key ({key_role})")
        ax.set_ylabel(f"query ({query_role})")
        ax.set_title(f"{panel}, step {step}", fontsize=9)
        bar = fig.colorbar(image, ax=ax, shrink=0.8)
        bar.set_label("attention score, summed over heads", fontsize=8)
    return _save(fig, path)


def plot_variants(
    full: dict[str, tuple[np.ndarray, np.ndarray]],
    variants: dict[str, tuple[dict[str, tuple[np.ndarray, np.ndarray]], int, tuple[int, int | None] | None]],
    path: Path,
    baseline: str = "nothing learned",
) -> Path:
    """Each knock-out / knock-in / mechanism variant against the full run: one panel per
    primitive, the members' median progress of the full run (black) and of each variant (a
    colour each; the knock-in's switch to the full language marked with a dotted line of its
    colour, a mechanism variant's intervention window as a bar of its colour at the
    foot). ``variants``: label ->
    (curves, switch step, window (from, to or None) or None)."""
    names = list(full)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, names):
        steps, progress = full[name]
        ax.plot(steps + 1, np.median(progress, axis=1), color="black", linewidth=1.8, label="full")
        for k, (variant, (curves, switch, window)) in enumerate(variants.items()):
            if name not in curves:
                continue
            color = colors[k % len(colors)]
            v_steps, v_progress = curves[name]
            ax.plot(v_steps + 1, np.median(v_progress, axis=1), color=color, linewidth=1.4, label=variant)
            if switch:
                ax.axvline(switch + 1, color=color, linestyle=":", linewidth=0.9)
            if window is not None:
                _window_bar(ax, window, v_steps[-1], color, k)
        ax.axhline(0.0, color="grey", linewidth=0.5, linestyle=":")
        ax.set_xscale("log")
        finals = [np.median(full[name][1], axis=1)[-1]] + [
            np.median(c[name][1], axis=1)[-1] for c, _, _ in variants.values() if name in c
        ]
        ax.set_ylim(max(-3.0, min(-1.0, float(np.nanmin(finals)))) - 0.05, 1.05)  # a variant left far below
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step + 1", fontsize=8)
        ax.set_ylabel("progress (median)", fontsize=8)
        ax.legend(frameon=False, fontsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(
        "each variant against the full run (dotted: a knock-in's switch; a bar at the foot: an "
        "intervention's window)",
        fontsize=9,
    )
    fig.text(0.01, 0.005, f"0 = {baseline}, on the full run's baselines", fontsize=6, color="grey")
    return _save(fig, path)


def plot_stages(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    onsets: dict[str, list[Onset]],
    steps: np.ndarray,
    states: np.ndarray,
    labels: list[str],
    path: Path,
    title: str,
) -> Path:
    """Progress per primitive (medians over members, median onsets dashed) above a strip plot of
    every member's latent state (one row per member, ``states`` (member, bin) on the bins' log-step
    grid ``steps``), on one log-step axis."""
    n_members, n_bins = states.shape
    fig, (top, strip) = plt.subplots(
        2, 1, figsize=(7, 3.2 + 0.12 * n_members), sharex=True, height_ratios=[2.2, 0.4 + 0.1 * n_members]
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, (curve_steps, progress)) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        top.plot(curve_steps + 1, np.median(progress, axis=1), color=color, linewidth=2, label=name)
        formed = [o.step for o in onsets.get(name, []) if not o.censored]
        if formed:
            top.axvline(np.median(formed) + 1, color=color, linewidth=0.8, linestyle="--")
    top.set_xscale("log")
    top.set_ylabel("progress (median)")
    top.set_ylim(*_progress_limits(curves))
    top.legend(frameon=False, fontsize=7, title="dashed: median onset", title_fontsize=7)
    top.set_title(title)
    # bin edges halfway (in log step) between the bins' steps, so each cell covers its bin
    x = np.log(steps + 1)
    edges = np.exp(np.r_[x[0] - (x[1] - x[0]) / 2, (x[:-1] + x[1:]) / 2, x[-1] + (x[-1] - x[-2]) / 2])
    n_states = int(states.max()) + 1
    palette = plt.get_cmap("tab10" if n_states <= 10 else "tab20")
    cmap = matplotlib.colors.ListedColormap([palette(i) for i in range(n_states)])
    strip.pcolormesh(
        edges, np.arange(n_members + 1), states, cmap=cmap, vmin=-0.5, vmax=n_states - 0.5, shading="flat"
    )
    strip.set_yticks(np.arange(n_members) + 0.5, labels, fontsize=5)
    strip.invert_yaxis()
    strip.set_xlabel("step + 1")
    handles = [matplotlib.patches.Patch(color=palette(i), label=f"state {i}") for i in range(n_states)]
    strip.legend(
        handles=handles, fontsize=6, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), ncol=1
    )
    return _save(fig, path)


def plot_essential_dynamics(
    steps: np.ndarray,
    coords: np.ndarray,
    explained: np.ndarray,
    onset_steps: dict[str, float],
    path: Path,
) -> Path:
    """Each member's trajectory in the first two principal components of the model's outputs
    (thin lines, points coloured by log step), the median onset of each primitive marked on
    every member's path at the snapshot nearest it (in log step)."""
    fig, ax = plt.subplots(figsize=(6, 5))
    colour = np.log10(steps + 1)
    for member in range(coords.shape[0]):
        ax.plot(coords[member, :, 0], coords[member, :, 1], color="grey", linewidth=0.5, alpha=0.6)
        points = ax.scatter(coords[member, :, 0], coords[member, :, 1], c=colour, cmap="viridis", s=10)
    markers = "^sDvP*X"
    for i, (name, step) in enumerate(onset_steps.items()):
        nearest = int(np.argmin(np.abs(np.log1p(steps) - np.log1p(step))))
        ax.scatter(
            coords[:, nearest, 0],
            coords[:, nearest, 1],
            marker=markers[i % len(markers)],
            s=45,
            facecolors="none",
            edgecolors=f"C{i}",
            label=f"{name} onset (step {step:.0f})",
        )
    bar = fig.colorbar(points, ax=ax)
    bar.set_label("log10(step + 1)")
    ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({explained[1]:.0%} of variance)")
    ax.set_title("essential dynamics: outputs on fixed inputs, PCA over snapshots", fontsize=9)
    if onset_steps:
        ax.legend(frameon=False, fontsize=7)
    return _save(fig, path)


def _progress_limits(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """y limits of a progress axis: down to the lowest median (not below -1), up to just over 1."""
    lowest = min((float(np.nanmin(np.median(p, axis=1))) for _, p in curves.values()), default=0.0)
    return max(-1.0, min(0.0, lowest)) - 0.05, 1.06


def _save(fig, path: Path) -> Path:
    """Lay out, write at the figures' one resolution, and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_attribution(
    steps: np.ndarray,
    primitives: list[str],
    components: list[str],
    median: np.ndarray,
    at: list[int],
    path: Path,
    whose: str = "member 0",
) -> Path:
    """Primitive x component heatmaps of one member's shares at the step indices ``at``, one
    panel per row so the text stays readable at any number of heads (``median``: (N, primitive,
    component), values in [-1, 1]; red pushes the rule's output up, blue against it)."""
    fig, axes = plt.subplots(
        len(at),
        1,
        figsize=(0.62 * len(components) + 2.6, (0.42 * len(primitives) + 0.9) * len(at) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for ax, index in zip(axes[:, 0], at):
        image = ax.imshow(median[index], cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(
            range(len(components)), components, rotation=90 if len(components) > 12 else 0, fontsize=9
        )
        ax.set_yticks(range(len(primitives)), primitives, fontsize=9)
        ax.set_title(f"step {int(steps[index])}", fontsize=10, loc="left")
        for (i, j), value in np.ndenumerate(median[index]):
            if abs(value) >= 0.1:
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.9, label="share of the rule's attribution mass")
    fig.suptitle(f"which components carry each primitive (exact attribution, {whose})", fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def _window_bar(ax, window: tuple[int, int | None], last_step: int, color: str, k: int) -> None:
    """An intervention window as a bar at the foot of the panel (one row per variant), on the
    log(step + 1) axis."""
    end = last_step if window[1] is None else window[1]
    ax.plot(
        [window[0] + 1, end + 1],
        [0.03 + 0.035 * k] * 2,
        transform=ax.get_xaxis_transform(),
        color=color,
        linewidth=3,
        solid_capstyle="butt",
    )


def plot_mechanism(
    runs: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    windows: dict[str, tuple[int, int | None] | None],
    path: Path,
) -> Path:
    """Mechanism variants against the full run, one panel per measure (``runs``: label ->
    measure -> (steps (N,), values (N, members))): the median over members of each, the
    intervention window as a bar of the variant's colour at the foot of each panel."""
    measures = list(dict.fromkeys(m for curves in runs.values() for m in curves))
    fig, axes = plt.subplots(1, len(measures), figsize=(3.6 * len(measures), 2.9), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, measure in zip(axes[0], measures):
        for k, (label, curves) in enumerate(runs.items()):
            if measure not in curves:
                continue
            color = "black" if label == "full" else colors[k % len(colors)]
            steps, values = curves[measure]
            ax.plot(steps + 1, np.median(values, axis=1), color=color, linewidth=1.5, label=label)
            window = windows.get(label)
            if window is not None:
                _window_bar(ax, window, steps[-1], color, k)
        if "progress" in measure:  # the early, far negative part says nothing about the variants
            ax.set_ylim(-0.5, 1.05)
        if "value" in measure:
            ax.set_yscale("symlog", linthresh=1e-5)
        ax.set_xscale("log")
        ax.set_title(measure, fontsize=8)
        ax.set_xlabel("step + 1", fontsize=8)
        ax.legend(frameon=False, fontsize=6)
    fig.suptitle(
        "mechanism variants against the full run (median over members; a bar at the foot: an intervention's "
        "window)",
        fontsize=9,
    )
    return _save(fig, path)


def plot_llc(
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    onsets: dict[str, list[Onset]],
    path: Path,
    title: str,
) -> Path:
    """LLC per refinement against step (members thin, median bold, the smoothed median dotted
    where enough snapshots lie within the smoother's window),
    one panel for the whole model and the primitives, one for the heads; primitives' median
    onsets dashed. ``curves``: refinement -> (steps (snapshot,), llc (snapshot, member), (grid
    steps, smoothed) stacked (2, grid))."""
    heads = [n for n in curves if n.startswith("L") and "H" in n and n[1:].replace("H", "").isdigit()]
    panels = [[n for n in curves if n not in heads], heads] if heads else [list(curves)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, names in zip(axes[0], panels):
        top = 0.0  # the axis follows the medians: one wild member estimate must not flatten the rest
        for i, name in enumerate(names):
            steps, llc, smooth = curves[name]
            color = colors[i % len(colors)]
            ax.plot(steps + 1, llc, color=color, linewidth=0.5, alpha=0.4)
            shown = np.where(llc >= 0, llc, np.nan)
            with warnings.catch_warnings():  # a snapshot with no estimate of this refinement
                warnings.simplefilter("ignore", RuntimeWarning)
                median = np.nanmedian(shown, axis=1)
            if np.isfinite(median).any():
                top = max(top, float(np.nanmax(median)))
            estimated = np.isfinite(median)  # joined across snapshots this refinement skipped
            with np.errstate(all="ignore"):
                ax.plot(
                    steps[estimated] + 1,
                    median[estimated],
                    color=color,
                    linewidth=2,
                    marker="o",
                    markersize=3,
                    label=name,
                )
            if smooth.size:
                ax.plot(smooth[0] + 1, smooth[1], color=color, linewidth=1, linestyle=":")
            formed = [o.step for o in onsets.get(name, []) if not o.censored]
            if formed:
                ax.axvline(np.median(formed) + 1, color=color, linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short log axis
        ax.set_xlabel("step + 1")
        ax.set_ylabel("LLC estimate")
        ax.set_ylim(0, 1.4 * top if top > 0 else None)
        ax.legend(
            frameon=False,
            fontsize=7,
            title="bold: member median; dashed: median onset\n(thin: members, clipped at the top)",
            title_fontsize=7,
        )
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
