"""The report's components section: exact attribution shares, serving heads, shared outputs, MLPs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.plots import (
    plot_attribution,
)
from analysis.shares import (
    FIGURE_FRACTIONS,
    MASS_FRACTION,
    component_shares,
    reused_heads,
    rule_shares,
    source_shares,
    top_heads,
)
from devinterp.store.timeline import Timeline


def attribution_section(
    timeline: Timeline,
    out: Path,
    threshold: float = 0.2,
    at_steps: list[int] | None = None,
    member: int = 0,
) -> tuple[list[str], list[Path]]:
    """The "Components" section: which components carry each primitive at the end (per member:
    heads carry no common labels across members), the heads each member reuses for several
    primitives and when each started serving each, the sources of the top later-layer heads'
    parts; attribution.png (one member's shares at three steps, or at ``at_steps``)."""
    shares = component_shares(timeline)
    if shares is None or not len(shares.steps):
        return [], []
    M = shares.shares.shape[-1]
    member = min(member, M - 1)
    log_steps = np.log(shares.steps + 1.0)
    # where the member's attribution mass first reaches FIGURE_FRACTIONS of its final value, and
    # the end: the moments the components take over, not two all-direct panels at the start
    at = sorted({*shares.mass_steps(member), len(shares.steps) - 1})
    if at_steps:  # the steps asked for (--steps), each at the nearest attribution row in log-step
        at = sorted({int(np.argmin(np.abs(log_steps - np.log(step + 1.0)))) for step in at_steps})
    figure = plot_attribution(
        shares.steps,
        shares.primitives,
        shares.components,
        shares.shares[..., member],
        at,
        out / "attribution.png",
        f"member {member}",
    )
    *first, last = FIGURE_FRACTIONS
    fractions = ", ".join(f"{100 * f:.0f}" for f in first) + f" and {last:.0%}"  # "10, 50 and 90%"
    lines = [
        "## Components (exact attribution)",
        "",
        "Each primitive's expected centred logit (its rules' logits minus the mean logit, read along their "
        "true distributions), split exactly over the direct path and the heads "
        "(devinterp/metrics/attribution.py), "
        "as shares of its attribution mass (the parts' absolute values sum to 1; negative: against the "
        f"output), at step {int(shares.steps[-1])}. Heads carry no common labels across members, so the "
        "top head is found in each member. A component serves a primitive at a share of at least "
        f"{threshold} once the primitive's mass (its parts' absolute sum) is at least "
        f"{MASS_FRACTION:.0%} of its final mass in that member (a large share of a tiny mass early "
        "in training is not yet a mechanism). attribution.png shows member "
        f"{member} where its mass first reaches {fractions} of the final value, and at the end"
        + (" (here at the steps asked for)." if at_steps else "."),
        "",
        "| primitive | direct share (median) | top head's share (median) | its layer: members | "
        "members whose top head serves it |",
        "|---|---|---|---|---|",
    ]
    lines += top_head_lines(shares, threshold)
    lines += reuse_lines(shares, threshold)
    lines += shared_output_lines(timeline, threshold)
    lines += route_lines(timeline, shares)
    return lines + [""], [figure]


def top_head_lines(shares, threshold: float) -> list[str]:
    """Per primitive: the direct path's and the top head's median share at the end, the top
    heads' layers and how many serve it; then each member's top head (16 members at most)."""
    final = shares.shares[-1]  # (P, C, M)
    top = top_heads(shares)  # (P, M)
    M = final.shape[-1]
    lines = []
    for i, p in enumerate(shares.primitives):
        top_share = final[i, top[i], np.arange(M)]
        layers = [shares.components[c][:2] for c in top[i]]
        by_layer = ", ".join(f"{layer} {layers.count(layer)}" for layer in sorted(set(layers)))
        lines.append(
            f"| {p} | {np.median(final[i, 0]):+.2f} | {np.median(top_share):+.2f} | {by_layer} | "
            f"{int((top_share >= threshold).sum())} of {M} |"
        )
    if M <= 16:
        lines += [
            "",
            "Top head per member (its share):",
            "",
            "| member | " + " | ".join(shares.primitives) + " |",
        ]
        lines.append("|---|" + "---|" * len(shares.primitives))
        for m in range(M):
            cells = [
                f"{shares.components[top[i, m]]} ({final[i, top[i, m], m]:+.2f})"
                for i in range(len(shares.primitives))
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def reuse_lines(shares, threshold: float) -> list[str]:
    """Heads serving two or more primitives at the end, grouped by the primitives they serve, with
    the order in which each started serving them."""
    M = shares.shares.shape[-1]
    lines = []
    reused = reused_heads(shares, threshold)
    lines += [
        "",
        f"Reuse: heads serving two or more primitives at the end, in {len({r.member for r in reused})} "
        f"of {M} members.",
    ]
    if reused:
        combos: dict[tuple[str, ...], list] = {}
        for r in reused:
            combos.setdefault(tuple(sorted(r.onsets)), []).append(r)
        lines.append("")
        for combo, items in sorted(combos.items(), key=lambda kv: -len(kv[1])):
            order = [
                " then ".join(f"{p} ({s})" for p, s in sorted(r.onsets.items(), key=lambda kv: kv[1]))
                for r in items
            ]
            firsts = [min(r.onsets, key=r.onsets.get) for r in items]
            first_counts = ", ".join(f"{p} first in {firsts.count(p)}" for p in sorted(set(firsts)))
            examples = "; ".join(
                f"member {r.member} {r.component}: {o}" for r, o in list(zip(items, order))[:4]
            )
            lines.append(f"- {' + '.join(combo)}: {len(items)} heads ({first_counts}). E.g. {examples}")
    return lines


def route_lines(timeline: Timeline, shares) -> list[str]:
    """Where the top later-layer head's part comes from (members 0 to 3), as shares of its part."""
    top = top_heads(shares)  # (P, M)
    M = shares.shares.shape[-1]
    routes = []
    for i, p in enumerate(shares.primitives):
        for m in range(min(M, 4)):
            head = shares.components[top[i, m]]
            if head.startswith("L0"):
                continue
            sources = source_shares(timeline, p, head)
            if sources:
                last = {s: float(v[-1, m]) for s, v in sources.items()}
                total = sum(abs(v) for v in last.values()) or 1.0
                parts = ", ".join(f"{s} {v / total:+.2f}" for s, v in last.items() if abs(v) / total >= 0.05)
                routes.append(f"- {p}, member {m}, {head}: {parts}")
    if not routes:
        return []
    return [
        "",
        "Sources of the top later-layer head's part (shares of the head's part, Shapley over sources; "
        "members 0 to 3):",
        "",
        *routes,
    ]


def shared_output_lines(timeline: Timeline, threshold: float = 0.2) -> list[str]:
    """Output tokens that rules of two or more primitives produce (the most likely token of each
    rule's true distribution in its minimal contexts): per member, the top head of each such rule
    and whether one head serves them all, so "is a shared output carried by shared or separate
    components" gets a measured answer."""
    from devinterp.metrics.attribution import RuleAttribution
    from devinterp.restore import model_config, run_language  # torch: only where weights are read

    found = rule_shares(timeline)
    language = run_language(timeline)
    if found is None or language is None:
        return []
    rules, components, shares, _ = found
    cfg = model_config(timeline.meta["config"])
    attribution = RuleAttribution(language, cfg)
    outputs = (attribution.average @ attribution.readout).argmax(-1).tolist()  # (R,) each rule's top output
    by_output: dict[int, list[str]] = {}
    for rule, token in zip(attribution.rules, outputs):
        by_output.setdefault(token, []).append(rule)
    shared = {t: rs for t, rs in by_output.items() if len({r.split("/")[0] for r in rs}) >= 2}
    if not shared:
        return []
    final = shares[-1]  # (R, C, M)
    M = final.shape[-1]
    lines = [
        "",
        "Shared outputs: tokens that rules of several primitives produce, and the head each rule's "
        "share is largest on, per member (its share; the direct path's share after the bar).",
        "",
    ]
    for token, members_rules in shared.items():
        index = [rules.index(r) for r in members_rules]
        lines.append(f"Output `{language.vocab.tokens[token]}`:")
        lines.append("")
        lines.append("| member | " + " | ".join(members_rules) + " | the head serving most of them |")
        lines.append("|---|" + "---|" * (len(members_rules) + 1))
        same, across = 0, 0
        for m in range(M):
            tops = [int(final[r, 1:, m].argmax()) + 1 for r in index]
            served = {c: [r for r in index if final[r, c, m] >= threshold] for c in range(1, len(components))}
            best = max(
                served, key=lambda c: (len(served[c]), len({rules[r].split("/")[0] for r in served[c]}))
            )
            kinds = {rules[r].split("/")[0] for r in served[best]}
            same += len(served[best]) == len(index)
            across += len(kinds) >= 2
            cells = [
                f"{components[t]} ({final[r, t, m]:+.2f} \\| {final[r, 0, m]:+.2f})"
                for r, t in zip(index, tops)
            ]
            lines.append(
                f"| {m} | "
                + " | ".join(cells)
                + f" | {components[best]}: {len(served[best])} of {len(index)} "
                f"rules, {len(kinds)} primitives |"
            )
        lines += [
            "",
            f"One head serves every rule producing it in {same} of {M} members; one head serves rules of "
            f"two or more primitives producing it in {across} of {M}.",
            "",
        ]
    return lines


def mlp_section(timeline: Timeline) -> list[str]:
    """For a bilinear-MLP run: at the last snapshot, per MLP layer and token-level rule, the
    eigenvalue of largest magnitude of the direct-path interaction matrix along the rule's output
    and how much of its eigenvector lies on each primitive's input tokens (the tokens it fires on:
    the last slot of its minimal contexts; squared weights of a unit vector, so 1 = entirely on
    them; a primitive firing on every token, the category fallback, is left out), median over
    members: which rules' inputs the MLP reads to push each rule's output."""
    import torch

    from devinterp.metrics.attribution import MlpEigenMetrics, mlp_eigen
    from devinterp.restore import (  # torch: only where weights are read
        model_config,
        run_language,
        snapshot_model,
    )

    slots = [s for s in range(len(timeline.snapshot_steps)) if timeline.snapshot_steps[s] >= 0]
    if (
        not slots or not model_config(timeline.meta["config"]).mlp
    ):  # snapshots first: a run without them has no model
        return []
    language = run_language(timeline)
    if language is None:
        return []
    model, step = snapshot_model(timeline, slots[-1])
    metrics = MlpEigenMetrics(language, model.cfg, k=1)
    inputs = {  # the tokens each primitive fires on: the last slot of its minimal contexts
        p.name: sorted({c.tokens[-1] for c in p.minimal_contexts()})
        for p in language.primitives
        if p.name in timeline.label_names
    }
    inputs = {name: tokens for name, tokens in inputs.items() if len(tokens) < language.d_vocab}  # not all
    lines = [
        "## The MLP's direct path",
        "",
        f"At step {step}: per MLP layer and rule, the eigenvalue of largest magnitude of the direct-path "
        "interaction matrix along the rule's output (Pearce et al. 2024), and the share of its eigenvector "
        "on the tokens each primitive fires on (median over members; a uniform vector puts n / V on n "
        "tokens).",
        "",
        "| layer | rule | top eigenvalue | on its own tokens | " + " | ".join(inputs) + " |",
        "|---|---|---|---|" + "---|" * len(inputs),
    ]
    own = [  # the tokens each rule fires on: the last slot of its own contexts
        sorted(set(metrics.rules.tokens[row > 0, -1].tolist())) for row in metrics.rules.average
    ]
    with torch.no_grad():
        read = metrics.read_directions(model)
        for layer in range(model.cfg.n_layers):
            values, vectors = mlp_eigen(model, layer, read, k=1)  # (M, R, 1), (M, R, V, 1)
            mass = vectors[..., 0].pow(2)  # (M, R, V)
            for r, rule in enumerate(metrics.rules.rules):
                on = [float(mass[:, r, tokens].sum(-1).median()) for tokens in inputs.values()]
                mine = float(mass[:, r, own[r]].sum(-1).median())
                lines.append(
                    f"| L{layer} | {rule} | {float(values[:, r, 0].median()):+.3g} | {mine:.2f} "
                    f"({len(own[r])} of {language.d_vocab}) | " + " | ".join(f"{v:.2f}" for v in on) + " |"
                )
    return lines + [""]
