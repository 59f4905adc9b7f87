"""Figures read from weight snapshots: QK patterns and the direct path at chosen steps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from analysis.plots import (
    plot_direct_path,
    plot_qk_slices,
)
from devinterp.language.primitive import QKView
from devinterp.store.timeline import Timeline


def qk_views(timeline: Timeline) -> dict[str, tuple[str, QKView]]:
    """Primitive name -> (kind, the QK slice it declares), from the language spec the timeline
    keeps, for the primitives the run trained on; none for a corpus."""
    from devinterp.restore import run_language  # torch: only where weights are read

    language = run_language(timeline)
    if language is None:  # a corpus's description, or a spec this version cannot read
        return {}
    trained = timeline.primitive_kinds
    return {
        p.name: (p.kind, view)
        for p in language.primitives
        if (view := p.qk_view()) is not None and (not trained or p.name in trained)
    }


def circuit_figures(
    timeline: Timeline, out: Path, at_steps: list[int] | None = None, member: int = 0
) -> list[Path]:
    """Direct-path heatmaps, and each primitive's own QK slice (``Primitive.qk_view``), of one
    member at the snapshots nearest ``at_steps`` in log(step + 1) (default: one midway and the
    last), each kind of figure on one colour scale across the steps."""
    import torch

    from devinterp.metrics import circuits
    from devinterp.restore import snapshot_model  # torch: only where weights are read

    steps = timeline.snapshot_steps
    written = np.flatnonzero(steps >= 0)
    if not len(written):
        return []
    if at_steps:
        nearest = lambda s: int(written[np.argmin(np.abs(np.log1p(steps[written]) - np.log1p(s)))])  # noqa: E731
        slots = sorted({nearest(s) for s in at_steps})
        for wanted in at_steps:
            got = int(steps[nearest(wanted)])
            if abs(np.log1p(got) - np.log1p(wanted)) > 0.1:  # more than ~10% away: say so
                print(
                    f"notice: --steps {wanted}: the nearest weight snapshot is at step {got}", file=sys.stderr
                )
    else:
        slots = sorted({int(written[-1]), int(written[len(written) // 2])})
    views = qk_views(timeline)
    vocab = list(timeline.vocab)
    member = min(max(0, member), timeline.n_members - 1)
    directs, qk = {}, {}  # step -> matrix; (primitive, step) -> {panel: matrix}
    for slot in slots:
        model, step = snapshot_model(timeline, slot)
        with torch.no_grad():
            directs[step] = circuits.direct_path(model)[member].numpy()
            for name, (_, view) in views.items():
                offsets = view.offsets(model.cfg.n_ctx)
                if not offsets:
                    continue
                slices = {}
                for layer in range(model.cfg.n_layers):
                    pattern = sum(circuits.pattern_at_offset(model, layer, d)[member].sum(0) for d in offsets)
                    slices[f"layer {layer}"] = (pattern / len(offsets)).numpy()[
                        np.ix_(view.queries, view.keys)
                    ]
                qk[name, step] = (slices, offsets)
    # one colour scale per figure kind across the steps, so growth reads as growth
    direct_limit = max(float(np.abs(m).max()) for m in directs.values()) or 1.0
    paths = []
    for step, direct in directs.items():
        paths.append(
            plot_direct_path(
                direct,
                vocab,
                timeline.token_category,
                list(timeline.categories),
                step,
                out / f"direct_path_step{step}.png",
                limit=direct_limit,
                member=member,
            )
        )
    for name, (kind, view) in views.items():
        mine = {step: value for (n, step), value in qk.items() if n == name}
        if not mine:
            continue
        limit = max(float(np.abs(m).max()) for slices, _ in mine.values() for m in slices.values()) or 1.0
        for step, (slices, offsets) in mine.items():
            title = (
                f"{name} ({kind}): {view.query_role} x {view.key_role}, offsets {offsets[0]}..{offsets[-1]}, "
                f"member {member}"
            )
            paths.append(
                plot_qk_slices(
                    slices,
                    [vocab[t] for t in view.queries],
                    [vocab[a] for a in view.keys],
                    step,
                    out / f"qk_{name}_step{step}.png",
                    title=title,
                    query_role=view.query_role,
                    key_role=view.key_role,
                    limit=limit,
                )
            )
    return paths
