"""``devinterp analyze``: onsets, ordering, dependence, figures and a report from run folders.

Runs of the full language pool their members (each (run, member) is one unit); knock-out and
knock-in runs (recognised from their stored config) feed the dependence verdicts, and runs with
mechanism interventions the suppression verdicts.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from analysis.attribution import (
    FIGURE_FRACTIONS,
    MASS_FRACTION,
    component_shares,
    reused_heads,
    rule_shares,
    source_shares,
    top_heads,
)
from analysis.dependence import (
    UNTESTABLE,
    Dependence,
    MechanismEffect,
    dependence,
    interventions_of,
    mechanism_effects,
    mechanism_sentences,
    released_at,
    switch_step_of,
    variant_of,
)
from analysis.onset import Onset, primitive_onsets, primitive_progress
from analysis.ordering import (
    Ordering,
    infer_ordering,
    lead_lag,
    smallest_holm_p,
    smallest_wilcoxon_p,
    units_needed,
)
from analysis.plots import (
    plot_attribution,
    plot_dag,
    plot_direct_path,
    plot_essential_dynamics,
    plot_llc,
    plot_mechanism,
    plot_progress,
    plot_qk_slices,
    plot_stages,
    plot_variants,
    plot_weight_vs_probe,
)
from analysis.stages import (
    MAX_STATES,
    N_BINS,
    NEAR_ONSET,
    SHARP,
    StageFit,
    fit_stages,
    near_onsets,
    stage_data,
)
from analysis.timeline import Timeline, TimelineError, load_timeline
from analysis.units import Pool, censor_at, pool_text, pool_units
from devinterp.language import SpecError, parse_language
from devinterp.language.primitive import QKView
from devinterp.schema import UNMEASURABLE


@dataclass(frozen=True)
class Analysis:
    primitives: list[str]
    onsets: dict[str, dict[str, list[Onset]]]  # source -> primitive -> onsets over units
    ordering: Ordering
    lead_lag: dict[str, float]  # "X->Y": log-step lag of Y behind X (positive: X leads)
    dependence: list[Dependence]
    n_units: int
    yardstick: str = "blind"  # what progress 0 means (devinterp/baselines.py)
    mechanism: list[MechanismEffect] = field(default_factory=list)
    unmeasurable: dict[str, list[str]] = field(default_factory=dict)  # source -> primitives
    controls: list[str] = field(default_factory=list)  # intervention runs analysed on their own
    # other yardstick -> its ordering DAG's edges, where it can be measured (schema 3 for blind)
    other_yardsticks: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    pool: Pool | None = None  # which members count, repeats left out, the common horizon


YARDSTICK_TEXT = {
    "blind": "the best prediction of a model that cannot read what the primitive needs (the best pool of "
    "the knocked-out language, the context-limited oracles the primitive's type admits and uniform)",
    "knock_out": "the best prediction without the primitive (the knocked-out language mixed with uniform; "
    "uniform for the category fallback)",
    "uniform": "the uniform prediction",
}


def find_timelines(paths: list[str | Path]) -> list[Path]:
    """Timeline files under the given paths: a file, a run folder, or a folder of run folders."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif (path / "timeline.h5").is_file():
            found.append(path / "timeline.h5")
        elif path.is_dir() and sorted(path.glob("*/timeline.h5")):
            found += sorted(path.glob("*/timeline.h5"))
        else:
            raise TimelineError(f"{path}: no timeline.h5 here or in its run folders")
    return found


def progress_or_none(timeline: Timeline, primitive: str, source: str, yardstick: str = "blind"):
    try:
        steps, progress = primitive_progress(timeline, primitive, source, yardstick)
    except KeyError:  # no metric of this source for the primitive
        return None
    return None if np.isnan(progress).all() else (steps, progress)  # all NaN: unmeasurable


def pooled_onsets(
    timelines: list[Timeline],
    primitives: list[str],
    level: float,
    source: str,
    yardstick: str,
    pool: Pool,
) -> dict[str, list[Onset]]:
    """Every unit's onsets: each independent member once, censored at the shortest horizon
    (analysis/units.py: ``pool_units``)."""
    pooled: dict[str, list[Onset]] = {p: [] for p in primitives}
    for index, timeline in enumerate(timelines):
        onsets = primitive_onsets(timeline, primitives, level=level, source=source, yardstick=yardstick)
        for p in primitives:
            counted = [o for o in onsets.get(p, []) if o.member in pool.keep[index]]
            pooled[p] += censor_at(counted, pool.horizon)
    return {p: units for p, units in pooled.items() if units}  # primitives this source measures


def analyze_timelines(
    timelines: list[Timeline],
    level: float = 0.5,
    source: str = "probe",
    alpha: float = 0.01,
    yardstick: str = "blind",
) -> Analysis:
    full = [t for t in timelines if variant_of(t)[0] == "full"]
    variants = [t for t in timelines if variant_of(t)[0] != "full"]
    controls: list[str] = []
    if not full and variants and all(variant_of(t)[0] == "mechanism" for t in variants):
        # runs that train with interventions, given alone (a control such as the direct-path-only
        # model): analysed as they are, and said so
        full, variants = variants, []
        controls = sorted({variant_of(t)[1][0] for t in full})
    if not full:
        raise TimelineError(
            "no run of the full language among the timelines (only knock-out/knock-in variants)"
        )
    primitives = [p for p in full[0].label_names if p != "start"]
    pool = pool_units(full)
    onsets = {s: pooled_onsets(full, primitives, level, s, yardstick, pool) for s in ("probe", "weight")}
    ordering = infer_ordering(onsets[source], alpha=alpha)
    curves = {p: c for p in primitives if (c := progress_or_none(full[0], p, source, yardstick)) is not None}
    measured = list(curves)
    if not measured:
        raise TimelineError(
            f"{full[0].path}: no primitive has a {source} progress metric to order by (a corpus "
            "without logp has no excess loss, and a corpus has no weight-derived metrics)"
        )
    lags = {
        f"{a}->{b}": lead_lag(curves[a][0], curves[a][1], curves[b][1])
        for i, a in enumerate(measured)
        for b in measured[i + 1 :]
    }
    found = (
        dependence(full, variants, level=level, source=source, alpha=alpha, yardstick=yardstick)
        if variants
        else []
    )
    effects = mechanism_effects(full, variants, level=level, source=source, alpha=alpha, yardstick=yardstick)
    unmeasurable = {
        s: [p for p in primitives if unmeasurable_on(full[0], p, s, yardstick)] for s in ("probe", "weight")
    }
    others = {}
    for other in YARDSTICK_TEXT:
        if other == yardstick:
            continue
        try:
            onsets_there = pooled_onsets(full, primitives, level, source, other, pool)
            others[other] = infer_ordering(onsets_there, alpha=alpha).edges
        except TimelineError:  # not measurable on it (an older schema): no sensitivity line
            continue
    return Analysis(
        primitives,
        onsets,
        ordering,
        lags,
        found,
        len(onsets[source][measured[0]]),
        yardstick,
        effects,
        unmeasurable,
        controls,
        others,
        pool,
    )


def yardstick_sensitivity(result: Analysis) -> list[str]:
    """One line per ordering edge that another yardstick reverses, drops or adds (its edges are
    every significant edge, not the transitive reduction), so an order that stands on what
    progress 0 means is read as such."""
    mine = set(result.ordering.edges)
    lines = []
    for other, edges in result.other_yardsticks.items():
        theirs = set(edges)
        for a, b in sorted(mine - theirs):
            change = f"reversed ({b} -> {a})" if (b, a) in theirs else "not significant"
            lines.append(f"Sensitivity: {a} -> {b} is {change} on the {other} yardstick.")
        for a, b in sorted(theirs - mine):
            if (b, a) not in mine:
                lines.append(f"Sensitivity: {a} -> {b} is an edge on the {other} yardstick only.")
    return lines


def unmeasurable_on(timeline: Timeline, primitive: str, source: str, yardstick: str) -> bool:
    """The primitive has metrics of this source, and none is measurable on the yardstick."""
    try:
        _, progress = primitive_progress(timeline, primitive, source, yardstick)
    except KeyError:
        return False
    return bool(np.isnan(progress).all())


def _median_iqr(onsets: list[Onset]) -> str:
    if not onsets:
        return "not measured"
    learned = [o.step for o in onsets if not o.censored]
    censored = sum(o.censored for o in onsets)
    if not learned:
        return f"censored ({censored}/{len(onsets)} never learned)"
    q1, q2, q3 = np.percentile(learned, [25, 50, 75])
    text = f"{q2:.0f} [{q1:.0f}, {q3:.0f}]"
    return text + (f", {censored}/{len(onsets)} censored" if censored else "")


def dag_labels(ordering: Ordering) -> dict[tuple[str, str], str]:
    """Each DAG arrow's evidence: units in which its source came first, and the corrected p."""
    labels = {}
    for pair in ordering.pairs:
        decided = pair.x_first + pair.y_first
        for a, b, first in ((pair.x, pair.y, pair.x_first), (pair.y, pair.x, pair.y_first)):
            if (a, b) in ordering.dag:
                labels[a, b] = f"{first}/{decided} first, Holm p {pair.holm_p:.2g}"
    return labels


def power_text(ordering: Ordering, n_units: int) -> str:
    """What the test can show with these units: the smallest reachable corrected p, and a
    warning, with the units that would do, when alpha is out of reach."""
    n_pairs = len(ordering.pairs)
    untied = max((p.x_first + p.y_first for p in ordering.pairs), default=0)
    best = smallest_holm_p(untied, n_pairs)
    text = (
        f"Power: with {untied} untied units (of {n_units}) and {n_pairs} pairs, the smallest Holm-corrected "
        f"p any pair can reach is {best:.2g} (every unit one way: 2 / 2^n, times {n_pairs})"
    )
    if best >= ordering.alpha:
        return (
            f"{text}. **alpha = {ordering.alpha} is out of reach: no edge can be found with these units**; "
            f"{units_needed(n_pairs, ordering.alpha)} untied units would reach it."
        )
    return f"{text}, below alpha = {ordering.alpha}."


def dependence_power_text(found: list[Dependence], alpha: float) -> str:
    """What the dependence tests can show: each shift's Wilcoxon test (uncorrected) on its paired
    units, with the smallest p the fewest of them can reach, and a warning when alpha is out of
    reach (then "no evidence" means "not testable here", not "no effect")."""
    sizes = [s.n_tested for d in found for s in (d.knock_out, d.knock_in) if s is not None]
    if not sizes or max(sizes) < 2:
        return (
            "Power: no shift has 2 or more paired units with a nonzero shift, so no Wilcoxon verdict "
            "is reachable; only a blocked majority (Y never formed in the variant) can give one."
        )
    fewest = min(sizes)
    best = smallest_wilcoxon_p(fewest)
    text = (
        f"Power: the shifts are tested on {fewest} to {max(sizes)} paired units with a nonzero shift; "
        f"with {fewest} the smallest Wilcoxon p a shift can reach is {best:.2g}"
    )
    if best >= alpha:
        return (
            f'{text}. **alpha = {alpha} is out of reach for those shifts: their "no evidence" means '
            f'"not testable with these units"**; {units_needed(1, alpha)} units would reach it '
            '(a blocked majority still gives "delayed").'
        )
    return f"{text}, below alpha = {alpha}."


def _shift_text(shift) -> str:
    if shift is None:
        return "-"
    dropped = f"; {shift.dropped} pairs left out (formed in neither run)" if shift.dropped else ""
    if not shift.n_units:
        return f"formed in neither run{dropped}"
    if shift.blocked:  # a unit where Y never formed counts the run's end: the shift is at least that
        return (
            f">= {shift.median:+.2f} [>= {shift.low:+.2f}, >= {shift.high:+.2f}], p {shift.p:.2g}, lower "
            f"bounds: never formed in the variant in {shift.blocked} of {shift.n_units}{dropped}"
        )
    return f"{shift.median:+.2f} [{shift.low:+.2f}, {shift.high:+.2f}], p {shift.p:.2g}{dropped}"


def window_of(timeline: Timeline) -> tuple[int, int | None] | None:
    """A mechanism variant's intervention window (first from_step, release or None), else None."""
    interventions = interventions_of(timeline)
    if not interventions:
        return None
    return min(int(i.get("from_step") or 0) for i in interventions), released_at(interventions)


def _intervention_text(interventions: list[dict]) -> str:
    parts = []
    for i in interventions:
        what = (
            f"penalty {i.get('metric')} x {i.get('weight')}"
            if i.get("kind") == "penalty"
            else f"clamp {i.get('component')} ({i.get('hold', 'zero')})"
        )
        members = f", members {i['members']}" if i.get("members") else ""
        parts.append(f"{what}, steps {i.get('from_step') or 0}-{i.get('to_step') or 'end'}{members}")
    return "; ".join(parts)


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
    final = shares.shares[-1]  # (P, C, M)
    top = top_heads(shares)  # (P, M)
    *first, last = FIGURE_FRACTIONS
    fractions = ", ".join(f"{100 * f:.0f}" for f in first) + f" and {last:.0%}"  # "10, 50 and 90%"
    lines = [
        "## Components (exact attribution)",
        "",
        "Each primitive's expected centred logit (its rules' logits minus the mean logit, read along their "
        "true distributions), split exactly over the direct path and the heads (devinterp/attribution.py), "
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
    lines += shared_output_lines(timeline, threshold)
    if routes:
        lines += [
            "",
            "Sources of the top later-layer head's part (shares of the head's part, Shapley over sources; "
            "members 0 to 3):",
            "",
            *routes,
        ]
    return lines + [""], [figure]


def shared_output_lines(timeline: Timeline, threshold: float = 0.2) -> list[str]:
    """Output tokens that rules of two or more primitives produce (the most likely token of each
    rule's true distribution in its minimal contexts): per member, the top head of each such rule
    and whether one head serves them all, so "is a shared output carried by shared or separate
    components" gets a measured answer."""
    from devinterp.attribution import RuleAttribution

    found = rule_shares(timeline)
    language = run_language(timeline)
    if found is None or language is None:
        return []
    rules, components, shares, _ = found
    cfg = model_config(timeline)
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

    from devinterp.attribution import MlpEigenMetrics, mlp_eigen

    slots = [s for s in range(len(timeline.snapshot_steps)) if timeline.snapshot_steps[s] >= 0]
    if not slots or not model_config(timeline).mlp:  # snapshots first: a run without them has no model
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


def mechanism_figure(
    full: Timeline, variants: list[Timeline], out: Path, source: str, yardstick: str
) -> tuple[Path, list[str]]:
    """mechanism.png: per mechanism variant and the full run, each penalised metric's value,
    induction's progress and its copy preference over training; and the copy preference at the
    end, which tells an induction circuit from a shortcut that reaches the same progress."""
    runs: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    windows: dict[str, tuple[int, int | None] | None] = {}
    lines = []
    for timeline in [full, *variants]:
        kind, names = variant_of(timeline)
        if kind not in ("full", "mechanism"):
            continue
        label = "full" if kind == "full" else names[0]
        curves = {}
        for name in timeline.names("intervention/*/value")[:1]:  # a variant's first intervention
            curves["first intervention's value"] = (timeline.steps(name), timeline.values(name))
        if (progress := progress_or_none(timeline, "induction", source, yardstick)) is not None:
            curves[f"induction {source} progress"] = progress
        if (preference := copy_preference_curve(timeline)) is not None:
            curves["induction copy preference"] = preference
            final = preference[1][-1]
            lines.append(
                f"- {label}: copy preference at step {preference[0][-1]}: median {np.median(final):.2f} "
                f"(members {', '.join(f'{v:.2f}' for v in final)})"
            )
        runs[label] = curves
        windows[label] = window_of(timeline)
    if lines:
        lines = [
            "Copy preference: in contexts [x, y1, z, y2, x] where y1 and y2 can both follow x, the model's "
            "share p(y1) / (p(y1) + p(y2)) of the token that followed x, read from the weights "
            "(devinterp/mechanisms.py): 1 = it copies, about 0.5 = it knows which tokens may follow x but "
            "not which one did, the mark of a shortcut that reaches induction progress without a "
            "previous-token head.",
            "",
            *lines,
            "",
        ]
    return plot_mechanism(runs, windows, out / "mechanism.png"), lines


def _in_window(timeline: Timeline) -> str:
    """Each intervention's median value and gradient norm over the steps and members it acted on."""
    parts = []
    for name in timeline.names("intervention/*/active"):
        stem = name.removesuffix("/active")
        active = timeline.values(name) > 0  # (steps, members)
        if not active.any():
            continue
        value, grad = timeline.values(f"{stem}/value")[active], timeline.values(f"{stem}/grad_norm")[active]
        parts.append(
            f"{stem.removeprefix('intervention/')}: value {np.median(value):.3g}, gradient norm "
            f"{np.median(grad):.3g} (medians over the {int(active.sum())} member-steps it acted on)"
        )
    return f" ({'; '.join(parts)})" if parts else ""


def mechanism_lines(effects: list[MechanismEffect], variants: list[Timeline]) -> list[str]:
    """The report's section on mechanism variants: a table per primitive and variant, and a
    sentence for every mechanism a primitive needs."""
    if not effects:
        return []
    lines = ["## Mechanism suppression", ""]
    for timeline in variants:
        kind, names = variant_of(timeline)
        if kind == "mechanism":
            text = _intervention_text(interventions_of(timeline))
            lines.append(f"- {names[0]}: {text}{_in_window(timeline)}")

    def onset(median: float) -> str:
        return "-" if math.isnan(median) else f"{median:.0f}"

    lines += [
        "",
        "| Y | variant | formed (variant / full) | median onset (variant / full) | formed after release | "
        "onset shift [95% CI] | final excess (variant / full) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in effects:
        after = (
            "-" if e.released_at is None else f"{e.formed_after_release} of {e.formed} (at {e.released_at})"
        )
        lines.append(
            f"| {e.y} | {e.variant} | {e.formed} / {e.full_formed} of {e.n_members} | "
            f"{onset(e.onset_median)} / {onset(e.full_onset_median)} | {after} | {_shift_text(e.shift)} | "
            f"{e.final_excess:.4f} / {e.full_final_excess:.4f} | {e.verdict} |"
        )
    lines += [
        "",
        "Formed: the onset was reached by the last step. Final excess: the median over members of the "
        "primitive's probe excess at the last step (nats per token), the suppression's effect on the "
        "final model.",
        "",
    ]
    sentences = mechanism_sentences(effects, variants)
    return lines + [f"- {s}" for s in sentences] + ([""] if sentences else [])


def _disagree(probe: list[Onset], weight: list[Onset]) -> str:
    if not probe or not weight:
        return ""
    a = [math.log(o.step + 1) for o in probe if not o.censored]
    b = [math.log(o.step + 1) for o in weight if not o.censored]
    if not a or not b:
        return "yes (censored in one)" if bool(a) != bool(b) else ""
    gap = float(np.median(b) - np.median(a))
    return (
        f"yes (weights {'later' if gap > 0 else 'earlier'} by x{math.exp(abs(gap)):.1f})"
        if abs(gap) > 0.5
        else ""
    )


def run_language(timeline: Timeline):
    """The language the run trained on, rebuilt from the spec the timeline keeps; None for a
    corpus's description or a spec this version cannot read."""
    try:
        return parse_language(yaml.safe_load(timeline.meta.get("language_spec", "")) or {})
    except (SpecError, yaml.YAMLError, TypeError, AttributeError):
        return None


def model_config(timeline: Timeline):
    """The run's ModelConfig from its stored config (fields this version does not know left out)."""
    from devinterp.model import ModelConfig

    config = yaml.safe_load(timeline.meta["config"])["model"]
    fields = ModelConfig.__dataclass_fields__
    return ModelConfig(**{k: v for k, v in config.items() if k in fields})


def snapshot_model(timeline: Timeline, slot: int):
    """(model, step) of weight snapshot ``slot``, rebuilt from the timeline's stored config
    (the only place analysis imports torch)."""
    import torch

    from devinterp.model import TensorTransformer

    model = TensorTransformer(model_config(timeline))
    step, weights = timeline.snapshot(slot)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(weights[name]))
    return model, step


def copy_preference_curve(timeline: Timeline) -> tuple[np.ndarray, np.ndarray] | None:
    """The share of the copied token among two plausible candidates
    (devinterp.mechanisms.copy_preference) at every weight snapshot: steps (n,), (n, members);
    None without snapshots, an induction primitive or a readable spec."""
    import torch

    from devinterp.mechanisms import copy_preference, two_candidate_contexts

    language = run_language(timeline)
    if language is None:
        return None
    tokens, copied, other = (torch.from_numpy(a) for a in two_candidate_contexts(language))
    slots = [s for s in range(len(timeline.snapshot_steps)) if timeline.snapshot_steps[s] >= 0]
    if not len(tokens) or not slots:
        return None
    steps, values = [], []
    with torch.no_grad():
        for slot in slots:
            model, step = snapshot_model(timeline, slot)
            steps.append(step)
            values.append(copy_preference(model, tokens, copied, other).numpy())
    return np.array(steps), np.stack(values)


def qk_views(timeline: Timeline) -> dict[str, tuple[str, QKView]]:
    """Primitive name -> (kind, the QK slice it declares), from the language spec the timeline
    keeps, for the primitives the run trained on; none for a corpus."""
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

    from devinterp import circuits

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


def run_header(timeline: Timeline) -> str:
    """The first full run's steps, members, model and language, from its stored config."""
    config = yaml.safe_load(timeline.meta.get("config", "")) or {}
    model, data = config.get("model") or {}, config.get("data") or {}
    keys = ("n_layers", "n_heads", "d_model", "d_head", "attention") + (
        ("d_mlp",) if model.get("mlp") else ()
    )
    shape = ", ".join(f"{key} {model[key]}" for key in keys if model.get(key) is not None)
    language = Path(str(data.get("language") or data.get("corpus") or "?")).name
    return (
        f"Run {timeline.run_name}: {timeline.last_step} steps, {timeline.n_members} members; "
        f"model: {shape or 'see config.yaml'}; "
        f"language {language}, sequences of {data.get('seq_len', '?')}, batch {data.get('batch_size', '?')}."
    )


def pooled_runs_lines(full: list[tuple[Path, Timeline]], pool: Pool | None) -> list[str]:
    """Where several runs pool: each with its steps, members and the members counted, then the
    repeats left out and the common horizon (analysis/units.py)."""
    if pool is None or len(full) < 2:
        return []
    runs = "; ".join(
        f"{t.run_name}: {t.last_step} steps, {t.n_members} members, {len(pool.keep[i])} counted"
        for i, (_, t) in enumerate(full)
    )
    return [f"Pooled runs: {runs}.", "", *(f"{line}\n" for line in pool_text(pool))]


def stages_section(
    full: list[Timeline],
    onsets: dict[str, list[Onset]],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    out: Path,
    yardstick: str,
    n_bins: int = N_BINS,
    max_states: int = MAX_STATES,
) -> tuple[list[str], list[Path], StageFit | None]:
    """The latent-state model of the full runs (analysis.stages) and essential dynamics of the
    first run's snapshots: the report's lines and figures."""
    lines = ["## Stages of training", ""]
    try:
        data = stage_data(full, n_bins=n_bins, yardstick=yardstick)
        fit = near_onsets(fit_stages(data, state_counts=range(1, max_states + 1)), onsets)
    except (ValueError, KeyError) as error:
        return lines + [f"No latent-state model: {error}.", ""], [], None
    bic = ", ".join(f"{k}: {v:.0f}" for k, v in fit.bic.items())
    lines += [
        f"A Gaussian HMM (Hu, Saphra et al. 2023) on {len(fit.data.features)} standardised features "
        f"({', '.join(fit.data.features)}; the training loss left out), {len(fit.data.steps)} log-step bins, "
        f"{len(fit.states)} members pooled. BIC picks **{fit.n_states} states** (BIC by state count: {bic}). "
        "States are numbered by the median over members of the first bin each member is in them (a "
        "member that never visits one counts as the run's end)."
        + "".join(f" {k} states: no fit, {why}." for k, why in sorted(fit.failed.items()))
        + (
            f" The count is the largest {'fitted' if fit.failed else 'tried'}: more states may fit "
            "better, so read them as a lower bound (`--max-states` offers more)."
            if fit.n_states == max(fit.bic)
            else ""
        ),
        "",
        f"A boundary is *sharp* where the members' features move at least {SHARP:g} times as far "
        "between its two bins as between neighbouring bins (a sudden change, such as a curriculum "
        "switch); the others cut a gradual change into states.",
        "",
        "| transition | members | sharp in | median step | nearest primitive onset (log-steps) | features "
        "that change most (standard units) |",
        "|---|---|---|---|---|---|",
    ]
    unplanted = []
    for t in fit.transitions:
        near = "" if t.nearest_onset is None else f"{t.nearest_onset[0]} ({t.nearest_onset[1]:+.2f})"
        if t.nearest_onset is None or abs(t.nearest_onset[1]) > NEAR_ONSET:
            unplanted.append(t)
        top = ", ".join(f"{name} {change:+.1f}" for name, change in t.top_features)
        counts = f"{t.n_sequences} | {t.n_sharp} | {t.median_step:.0f}"
        lines.append(f"| {t.before} -> {t.after} | {counts} | {near} | {top} |")
    matrix = ["| from \\ to | " + " | ".join(map(str, range(fit.n_states))) + " |"]
    matrix.append("|---" * (fit.n_states + 1) + "|")
    for i, row in enumerate(fit.transition_matrix):
        matrix.append(f"| {i} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    lines += ["", "Transition matrix (per bin):", "", *matrix, ""]
    if unplanted:
        lines.append(
            "Transitions with no primitive onset within "
            f"{NEAR_ONSET} log-steps (a stage no primitive explains): "
            + ", ".join(f"{t.before} -> {t.after} at step {t.median_step:.0f}" for t in unplanted)
            + "."
        )
    else:
        lines.append(f"Every transition lies within {NEAR_ONSET} log-steps of a primitive's median onset.")
    if fit.detours:
        for state, visitors in fit.detours.items():
            who = ", ".join(
                f"{fit.data.sequences[v]} (converges at step {fit.convergence_steps[v]:.0f})"
                for v in visitors
            )
            others = np.median([c for i, c in enumerate(fit.convergence_steps) if i not in visitors])
            lines.append(
                f"Detour: state {state} is visited by {len(visitors)} of {len(fit.states)} members: {who}; "
                f"the others converge at a median step of {others:.0f}."
            )
    else:
        lines.append("No detour state: every state is visited by at least half the members, or by none.")
    figures = [
        plot_stages(
            curves,
            onsets,
            fit.data.steps,
            fit.states,
            fit.data.sequences,
            out / "stages.png",
            f"latent states ({fit.n_states}, BIC) under the primitives' progress",
        )
    ]
    lines += ["", "Figure stages.png: the primitives' progress above every member's state sequence.", ""]
    try:
        from analysis.essential_dynamics import essential_dynamics

        dynamics = essential_dynamics(full[0])
    except KeyError as error:
        lines += [f"No essential dynamics: {error}.", ""]
        return lines, figures, fit
    medians = {
        p: float(np.median([o.step for o in v if not o.censored]))
        for p, v in onsets.items()
        if any(not o.censored for o in v)
    }
    figures.append(
        plot_essential_dynamics(
            dynamics.steps, dynamics.coords, dynamics.explained, medians, out / "essential_dynamics.png"
        )
    )
    share = ", ".join(f"{e:.0%}" for e in dynamics.explained)
    lines += [
        f"Essential dynamics (Hoogland et al. 2024): the outputs on 32 fixed sequences at the "
        f"{len(dynamics.steps)} weight snapshots of {full[0].run_name}, PCA "
        f"over snapshots and members together; the first components explain {share} of the variance "
        "(figure essential_dynamics.png, primitives' median onsets marked).",
        "",
    ]
    return lines, figures, fit


def llc_section(
    timeline: Timeline, onsets: dict[str, list[Onset]], out: Path
) -> tuple[list[str], list[Path]]:
    """The run's LLC estimates (``RUN/llc.h5``, from ``devinterp llc``): curves, their critical
    points beside the primitives' onsets, and the chains that went wrong."""
    from analysis.learning_coefficient import (
        MIN_POINTS,
        SMOOTH,
        critical_points,
        load_llc,
        median_curve,
        smoothed,
    )

    path = timeline.path.parent / "llc.h5"
    if not path.exists():
        return [], []
    estimates = load_llc(path)
    medians = {
        p: float(np.median(np.log1p([o.step for o in v if not o.censored])))
        for p, v in onsets.items()
        if any(not o.censored for o in v)
    }
    lines = [
        "## Learning coefficient",
        "",
        f"Local learning coefficients from {path.name} (devinterp llc): the median over members per "
        f"snapshot (estimates below 0, where the chains fell below L(w*), left out), smoothed over "
        f"{SMOOTH} log-steps where at least {MIN_POINTS} snapshots lie within {2 * SMOOTH:g} log-steps "
        "(elsewhere there is no smoothed curve: too few points to show a turn); critical points are "
        "where the smoothed curve turns (Hoogland et al. 2024), each beside the nearest primitive onset "
        "(log-steps).",
        "",
        "| refinement | snapshots | last step: median [IQR] | estimates below 0 | chains diverged | critical "
        "points (step: nearest onset) |",
        "|---|---|---|---|---|---|",
    ]
    curves = {}
    for name, found in estimates.items():
        steps, llc = found["steps"], found["llc"]
        median = median_curve(found)
        grid, smooth = smoothed(steps, median)
        curves[name] = (steps, llc, np.stack([grid, smooth]) if len(grid) else np.zeros((2, 0)))
        points = []
        for point in critical_points(name, steps, median):
            here = math.log1p(point.step)
            near = min(medians, key=lambda p: abs(here - medians[p])) if medians else None
            where = f"{near} {here - medians[near]:+.2f}" if near else "no onset"
            points.append(f"{point.kind} at {point.step:.0f}: {where}")
        last = llc[-1][np.isfinite(llc[-1])]
        quartiles = np.percentile(last, [25, 50, 75]) if len(last) else [math.nan] * 3
        lines.append(
            f"| {name} | {int(np.isfinite(llc).any(axis=1).sum())} | {quartiles[1]:.3g} [{quartiles[0]:.3g}, "
            f"{quartiles[2]:.3g}] | {int((llc < 0).sum())} of {int(np.isfinite(llc).sum())} | "
            f"{int(found['diverged'].sum())} | "
            f"{'; '.join(points) or 'none'} |"
        )
    step_sizes = {
        name: sorted({float(e) for e in found.get("eps", []) if np.isfinite(e)})
        for name, found in estimates.items()
    }
    if len({tuple(sizes) for sizes in step_sizes.values()}) > 1:  # --eps-for: say which eps made which curve
        lines += [
            "",
            "SGLD step sizes: "
            + "; ".join(f"{name} {', '.join(f'{e:g}' for e in sizes)}" for name, sizes in step_sizes.items())
            + ".",
        ]
    figure = plot_llc(curves, onsets, out / "llc.png", f"LLC over training ({timeline.path.parent.name})")
    lines += ["", "Figure llc.png: the LLC curves beside the primitives' onsets.", ""]
    role_lines, role_figures = llc_roles_section(timeline, estimates, onsets, out)
    return lines + role_lines, [figure, *role_figures]


def llc_roles_section(
    timeline: Timeline, estimates: dict, onsets: dict[str, list[Onset]], out: Path
) -> tuple[list[str], list[Path]]:
    """Head-refined LLCs by the role each head plays in its member (analysis.learning_coefficient
    .head_roles) against that member's heads with no role; ``llc_heads.png``."""
    from analysis.learning_coefficient import OTHERS, head_roles, role_curves

    roles = head_roles(timeline)
    curves = role_curves(estimates, roles)
    if not curves:
        return [], []
    steps, others = curves[OTHERS]
    lines = [
        "### Heads by role",
        "",
        "Per member, at the last diagnostics row: the head with the largest attribution share of each "
        "primitive's logit, and the layer-0 head with the highest previous-token score; 'other heads' is "
        "the member's median over its heads with no role. Wang et al. (2024) found induction-type heads "
        "end with lower refined LLCs than n-gram heads.",
        "",
        "| role | head per member | last snapshot: median [IQR] | members below their other heads |",
        "|---|---|---|---|",
    ]
    for role, (_, llc) in curves.items():
        finite = np.flatnonzero(np.isfinite(llc).all(axis=1) & np.isfinite(others).all(axis=1))
        if not len(finite):
            continue
        last = llc[finite[-1]]
        quartiles = np.percentile(last, [25, 50, 75])
        below = "" if role == OTHERS else f"{int((last < others[finite[-1]]).sum())} of {len(last)}"
        heads = ", ".join(roles.get(role, [])) or "(median of the rest)"
        lines.append(
            f"| {role} | {heads} | {quartiles[1]:.3g} [{quartiles[0]:.3g}, {quartiles[2]:.3g}] "
            f"(step {int(steps[finite[-1]])}) | {below} |"
        )
    figure = plot_llc(
        {role: (steps_, llc, np.zeros((2, 0))) for role, (steps_, llc) in curves.items()},
        {},
        out / "llc_heads.png",
        f"Head-refined LLC by role ({timeline.path.parent.name})",
    )
    return lines + ["", "Figure llc_heads.png: the head-refined LLC of each role's heads.", ""], [figure]


def write_report(
    paths: list[str | Path],
    out: str | Path,
    level: float = 0.5,
    source: str = "probe",
    alpha: float = 0.01,
    at_steps: list[int] | None = None,
    yardstick: str = "blind",
    member: int = 0,
    stages: bool = True,
    stage_bins: int = N_BINS,
    max_states: int = MAX_STATES,
    serve_threshold: float = 0.2,
) -> Path:
    """Analyse runs and write report.md, ordering.json and the PNGs into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = find_timelines(paths)
    timelines = [load_timeline(p) for p in files]
    result = analyze_timelines(timelines, level, source, alpha, yardstick)
    full = [(f, t) for f, t in zip(files, timelines) if variant_of(t)[0] == "full" or result.controls]
    first_file, first = full[0]
    figures = []
    curves = {
        p: c for p in result.primitives if (c := progress_or_none(first, p, source, yardstick)) is not None
    }
    first_onsets = {p: result.onsets[source][p][: first.n_members] for p in curves}
    figures.append(
        plot_progress(
            curves,
            first_onsets,
            out / "progress.png",
            f"{source} progress per primitive ({first.n_members} members, t{round(level * 100)} marked)",
            baseline=YARDSTICK_TEXT[yardstick],
        )
    )
    both = {
        p: {s: c for s in ("weight", "probe") if (c := progress_or_none(first, p, s, yardstick)) is not None}
        for p in result.primitives
    }
    figures.append(plot_weight_vs_probe(both, out / "weight_vs_probe.png", YARDSTICK_TEXT[yardstick]))
    (out / "ordering_dag.png").unlink(missing_ok=True)  # a figure of an earlier analysis here
    if result.ordering.dag:  # no edge: no figure, whose stacked nodes would read as an order
        figures.append(
            plot_dag(
                result.primitives,
                list(result.ordering.dag),
                out / "ordering_dag.png",
                dag_labels(result.ordering),
            )
        )
    variants = [t for t in timelines if variant_of(t)[0] != "full"]
    if variants:
        baselines = first.baselines(yardstick)
        drawn = {}
        for timeline in variants:
            kind, primitives = variant_of(timeline)
            label = f"{kind.replace('knock', 'knock-')} {'+'.join(primitives)}"
            drawn[label] = (
                {
                    p: primitive_progress(timeline, p, source, yardstick, baselines)
                    for p in curves
                    if progress_or_none(timeline, p, source, yardstick) is not None
                },
                switch_step_of(timeline),
                window_of(timeline),
            )
        figures.append(plot_variants(curves, drawn, out / "variants.png", YARDSTICK_TEXT[yardstick]))
    figures += circuit_figures(first, out, at_steps, member)

    t = f"t{round(level * 100)}"
    lines = [
        f"# Analysis of {len(files)} run(s)",
        "",
        run_header(first),
        "",
        f"Runs: {', '.join(str(f.parent) for f in files)}. Units (run, member) of the full language: "
        f"{result.n_units}. Onset = {t} of each primitive's progress, 1 - sum(excess) / sum(baseline) "
        "over its probe positions, or over its rules' weight-derived KLs weighted by their positions; "
        f"ordering from the {source} onsets, Holm-corrected Wilcoxon at alpha = {alpha}. Progress 0 = "
        f"{YARDSTICK_TEXT[yardstick]} (`--yardstick {yardstick}`), 1 = the true distribution"
        + (
            "; every knock-out/knock-in variant is measured on its full run's baselines."
            if result.dependence
            else "."
        ),
        "",
        *pooled_runs_lines(full, result.pool),
        *(
            [
                f"These runs train with interventions ({', '.join(result.controls)}: mechanism.interventions "
                "in their config) and are analysed on their own, as a control: no full run was given.",
                "",
            ]
            if result.controls
            else []
        ),
        "## Onsets (step; median [IQR] over units)",
        "",
        f"| primitive | probe {t} | weight {t} | probe and weights disagree |",
        "|---|---|---|---|",
    ]
    for p in result.primitives:
        probe, weight = result.onsets["probe"].get(p, []), result.onsets["weight"].get(p, [])
        lines.append(f"| {p} | {_median_iqr(probe)} | {_median_iqr(weight)} | {_disagree(probe, weight)} |")
    for source_name, names in result.unmeasurable.items():
        lines += [
            f"Unmeasurable on the {yardstick} yardstick ({source_name}): {p}: a model that cannot "
            f"implement it already predicts within {UNMEASURABLE:.0%} of the truth what it adds over "
            "uniform; left out of the ordering."
            for p in names
        ]
    lines += [
        "",
        "A censored onset means the primitive was never learned by the last step: it is reported as "
        "censored, not as a late number.",
        "",
        "## Ordering",
        "",
        "| X | Y | units | X first | Y first | ties | P(X first) [95% CI] | median gap (log step) | "
        "sign p | Wilcoxon p | Holm p | edge | same time: Holm p | lead-lag (log step) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in result.ordering.pairs:
        edge = {"x->y": f"{pair.x} -> {pair.y}", "y->x": f"{pair.y} -> {pair.x}"}.get(pair.edge, "")
        lag = result.lead_lag.get(f"{pair.x}->{pair.y}", math.nan)
        first = (
            f"{pair.p_x_first:.2f} [{pair.p_x_first_low:.2f}, {pair.p_x_first_high:.2f}]"
            if pair.x_first + pair.y_first
            else "all tied: no order to test"
        )
        same_mark = " (same time)" if pair.same_time else " (ordered, but close)" if pair.close else ""
        lines.append(
            f"| {pair.x} | {pair.y} | {pair.n_units} | {pair.x_first} | {pair.y_first} | {pair.ties} | "
            f"{first} | {pair.median_log_gap:+.2f} | {pair.sign_p:.2g} | {pair.wilcoxon_p:.2g} | "
            f"{pair.holm_p:.2g} | {edge} | {pair.equivalence_holm_p:.2g}{same_mark} | {lag:+.2f} |"
        )
    dag = ", ".join(f"{a} -> {b}" for a, b in result.ordering.dag)
    margin = result.ordering.margin
    same = [p for p in result.ordering.pairs if p.same_time]
    no_order = (
        f"No order: {', '.join(f'{p.x} and {p.y} (Holm p {p.equivalence_holm_p:.2g})' for p in same)} are "
        f"learned at the same time within +-{margin:g} log-steps (x{math.exp(margin):.2f} in step)."
        if same
        else f"No pair is shown to be learned at the same time within +-{margin:g} log-steps, so a missing "
        'edge means "not shown", not "no order".'
    )
    close = [p for p in result.ordering.pairs if p.close]
    if close:
        no_order += (
            " Ordered, but close: "
            + ", ".join(
                f"{p.x if p.edge == 'x->y' else p.y} before {p.y if p.edge == 'x->y' else p.x} (Holm p "
                f"{p.holm_p:.2g}), by less than {margin:g} log-steps (Holm p {p.equivalence_holm_p:.2g})"
                for p in close
            )
            + ": each pair comes in a consistent order, a small step apart."
        )
    lines += [
        "",
        "Columns: a unit is one member of one run; X first / Y first / ties count units by which onset "
        "came first; the gap is log(t_Y + 1) - log(t_X + 1), median over units (> 0: X first); "
        "lead-lag is the shift in log(step + 1) that maximises the correlation of the two "
        "member-averaged progress derivatives (> 0: X leads); it has no interval and depends on the "
        "run's length (the grid spans the whole run), so read it beside the onsets, never alone. "
        f"Same time: two one-sided Wilcoxon tests (TOST) that the gaps lie within +-{margin:g} log-steps, "
        "Holm-corrected; a unit where only one of the two formed counts as beyond the margin.",
        "",
        no_order,
        "",
        power_text(result.ordering, result.n_units),
        "",
        f"Ordering DAG (transitive reduction): {dag} (figure: ordering_dag.png, below)."
        if dag
        else "Ordering DAG: no significant edge, so no figure.",
        "",
    ]
    sensitivity = yardstick_sensitivity(result)
    if result.other_yardsticks:
        lines += sensitivity or [
            f"Sensitivity: every edge is the same on the {' and '.join(result.other_yardsticks)} "
            "yardstick" + ("s." if len(result.other_yardsticks) > 1 else ".")
        ]
        lines.append("")
    if result.dependence:
        lines += [
            "## Dependence (knock-out / knock-in)",
            "",
            "| Y | X | knock-out shift [95% CI], blocked | knock-in shift [95% CI] | verdict |",
            "|---|---|---|---|---|",
        ]
        notes = [
            "Shifts are in log(step + 1), variant minus full, median over paired members (> 0: later). "
            "A knock-in run's Y is timed from its switch to the full language (before it Y was not "
            "in the data), so a knock-in shift < 0 means Y formed faster once it could."
        ]
        for d in result.dependence:
            verdict = d.verdict.replace("Y", d.y).replace("X", d.x)
            lines.append(
                f"| {d.y} | {d.x} | {_shift_text(d.knock_out)} | {_shift_text(d.knock_in)} | {verdict} |"
            )
            if d.verdict == UNTESTABLE:
                notes.append(
                    f"Untestable: knocking out {d.x} leaves nothing that produces {d.lacks}, which the "
                    f"condition of {d.y} needs; {d.y} cannot occur in that variant (known before training, "
                    f"devinterp/language/reachability.py), so its onset there is not 'never learned' and "
                    f"says nothing about whether learning {d.y} needs {d.x}."
                )
        lines += [
            "",
            *[line for note in notes for line in (note, "")],
            dependence_power_text(result.dependence, alpha),
            "",
        ]
    lines += mechanism_lines(result.mechanism, variants)
    if result.mechanism:
        figure, route_lines = mechanism_figure(full[0][1], variants, out, source, yardstick)
        figures.append(figure)
        lines += route_lines
    fit = None
    if stages:
        stage_lines, stage_figures, fit = stages_section(
            [t for _, t in full], result.onsets[source], curves, out, yardstick, stage_bins, max_states
        )
        lines += stage_lines
        figures += stage_figures
    attribution_lines, attribution_figures = attribution_section(
        full[0][1], out, serve_threshold, at_steps, member
    )
    lines += attribution_lines + mlp_section(full[0][1])
    figures += attribution_figures
    llc_lines, llc_figures = llc_section(full[0][1], result.onsets[source], out)
    lines += llc_lines
    figures += llc_figures
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "ordering.json").write_text(
        json.dumps(
            {
                "level": level,
                "source": source,
                "yardstick": yardstick,
                "alpha": alpha,
                "units": result.n_units,
                "onsets": {
                    s: {p: [asdict(o) for o in v] for p, v in per.items()} for s, per in result.onsets.items()
                },
                "pairs": [asdict(p) for p in result.ordering.pairs],
                "edges": result.ordering.edges,
                "dag": result.ordering.dag,
                "edges_on_other_yardsticks": result.other_yardsticks,
                "lead_lag": result.lead_lag,
                "dependence": [asdict(d) for d in result.dependence],
                "mechanism": [asdict(e) for e in result.mechanism],
                "stages": None
                if fit is None
                else {
                    "n_states": fit.n_states,
                    "bic": fit.bic,
                    "failed_fits": fit.failed,
                    "features": fit.data.features,
                    "bin_steps": fit.data.steps.tolist(),
                    "states": fit.states.tolist(),
                    "transition_matrix": fit.transition_matrix.tolist(),
                    "transitions": [asdict(t) for t in fit.transitions],
                    "detours": {str(k): v for k, v in fit.detours.items()},
                },
            },
            indent=2,
            default=float,
        )
    )
    return report
