"""Does learning Y need X first? Knock-out and knock-in runs against the full language.

A knock-out run removes X from the language (its positions fall back to the next rule down); a
knock-in run trains on X alone (with the category fallback) for a set number of steps, then on
the full language (a curriculum, as in Singh et al. 2024, arXiv 2404.07129, who clamp
sub-circuits instead). Runs share member seeds, so member k
of a variant pairs with member k of the full run. For every Y the onset shift in log(step + 1),
variant minus full, is reported per variant with a 95% bootstrap interval of its median and a
Wilcoxon signed-rank p-value; a Y that never forms in the variant is counted as blocked (its
shift is then a lower bound: the last step minus the full run's onset). In a knock-in run every
Y that was not in the first phase's data is timed from the switch to the full language: before
it Y could not be learned, and counting those steps would make every knock-in look like a delay.

Verdict per (Y, X):
- "Y needs X": knocking X out blocks or delays Y, and knocking X in speeds Y up;
- "Y is delayed by removing X": knocking X out blocks or delays Y, without a speed-up shown;
- "no evidence": otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import yaml
from scipy.stats import wilcoxon

from analysis.onset import Onset, primitive_onsets
from analysis.strategies import run_switches
from devinterp.store.timeline import Timeline


@dataclass(frozen=True)
class Shift:
    """Onset shift of Y between a variant and the full run, over paired members."""

    n_units: int
    blocked: int  # members where Y formed in the full run but not in the variant
    median: float  # log(t_variant + 1) - log(t_full + 1); > 0 means later
    low: float
    high: float
    p: float
    dropped: int = 0  # pairs left out: Y formed in neither the full run nor the variant
    n_tested: int = 0  # units with a nonzero shift: what the Wilcoxon test sees


@dataclass(frozen=True)
class Dependence:
    y: str
    x: str
    knock_out: Shift | None
    knock_in: Shift | None
    verdict: str
    lacks: str = ""  # tokens Y needs that X's knock-out leaves nothing to produce (UNTESTABLE)


# the verdict where knocking out X leaves Y unable to fire: Y's condition needs a token only X
# produces, so the variant has no Y to time and removing X says nothing about learning Y
UNTESTABLE = "untestable: without X, Y can never fire"


def onset_shift(full: list[Onset], variant: list[Onset], n_boot: int = 2000, seed: int = 0) -> Shift:
    """Paired shift of one primitive's onsets, variant minus full, in log(step + 1)."""
    shifts, blocked, dropped = [], 0, 0
    for a, b in zip(full, variant):
        if a.censored and b.censored:
            dropped += 1
            continue
        blocked += b.censored and not a.censored
        shifts.append(math.log(b.step + 1) - math.log(a.step + 1))
    if not shifts:
        return Shift(0, 0, math.nan, math.nan, math.nan, 1.0, dropped)
    values = np.array(shifts)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(values, size=(n_boot, len(values))), axis=1)
    nonzero = values[values != 0]
    p = float(wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else 1.0
    return Shift(
        len(values),
        int(blocked),
        float(np.median(values)),
        float(np.percentile(medians, 2.5)),
        float(np.percentile(medians, 97.5)),
        p,
        dropped,
        len(nonzero),
    )


def config_section(timeline: Timeline, section: str) -> dict:
    """One section of the run's stored config (empty where the file has none)."""
    return (yaml.safe_load(timeline.meta.get("config", "")) or {}).get(section) or {}


def variant_of(timeline: Timeline) -> tuple[str, list[str]]:
    """("full" | "knockout" | "knockin", primitives) or ("mechanism", [variant name]) from the
    run's stored config; a run with interventions (``mechanism.interventions``) is a mechanism
    variant, named by its run name without the ``mechanism-`` that ``devinterp dependence`` gives."""
    if config_section(timeline, "mechanism").get("interventions"):
        name = config_section(timeline, "run").get("name") or timeline.path.parent.name
        return "mechanism", [name.removeprefix("mechanism-")]
    data = config_section(timeline, "data")
    if data.get("knockout"):
        return "knockout", list(data["knockout"])
    if data.get("knockin"):
        return "knockin", list(data["knockin"])
    return "full", []


def language_of(timeline: Timeline) -> str:
    """The name of the run's language (its spec's ``name``; else the spec path in its config)."""
    spec = yaml.safe_load(timeline.meta.get("language_spec") or "") or {}
    name = spec.get("name") if isinstance(spec, dict) else None
    return str(name or config_section(timeline, "data").get("language") or "")


@dataclass(frozen=True)
class LanguageShift:
    """An event's onset shift (a primitive's onset or a strategy switch) in runs of another
    language against the full language's runs, members paired by model seed and index."""

    language: str
    event: str
    shift: Shift


def language_shifts(full: list[Timeline], others: list[Timeline], events_of) -> list[LanguageShift]:
    """Per other language and event found in both: the paired shift, other minus full, in
    log(step + 1). ``events_of(timeline)`` -> event name -> one Onset per member. A run whose
    seed has no full run is left out (nothing to pair it with)."""
    base = {seed: events_of(t) for seed, t in full_runs_by_seed(full).items()}
    pairs: dict[tuple[str, str], tuple[list[Onset], list[Onset]]] = {}
    for timeline in others:
        reference = base.get(seed_of(timeline))
        if reference is None:
            continue
        for event, onsets in events_of(timeline).items():
            if event in reference:
                ours, theirs = pairs.setdefault((language_of(timeline), event), ([], []))
                ours += reference[event]
                theirs += onsets
    return [LanguageShift(lang, event, onset_shift(a, b)) for (lang, event), (a, b) in pairs.items()]


def switch_step_of(timeline: Timeline) -> int:
    """A knock-in run's switch to the full language (``data.knockin_steps``; 0 for other runs)."""
    data = config_section(timeline, "data")
    return int(data.get("knockin_steps") or 0) if data.get("knockin") else 0


def from_switch(onsets: dict[str, list[Onset]], switch: int, knocked_in: list[str]) -> dict[str, list[Onset]]:
    """A knock-in run's onsets of the primitives that were not in its data before ``switch``,
    counted from the switch (at least 0): before it they could not be learned, so the fair
    comparison with the full run is the time to learn them once they are in the data."""
    moved = {}
    for name, per_member in onsets.items():
        if name.split(":")[0] in knocked_in:  # a strategy switch goes with its primitive
            moved[name] = per_member
            continue
        moved[name] = [
            replace(
                o,
                step=max(0.0, o.step - switch),
                low=max(0.0, o.low - switch),
                high=max(0.0, o.high - switch),
            )
            for o in per_member
        ]
    return moved


def seed_of(timeline: Timeline) -> int | None:
    """The run's model seed (member k was initialised with seed + k) from its stored config."""
    return config_section(timeline, "model").get("seed")


def full_runs_by_seed(fulls: list[Timeline]) -> dict:
    """The full run of each model seed (the first one found)."""
    by_seed = {}
    for timeline in fulls:
        by_seed.setdefault(seed_of(timeline), timeline)
    return by_seed


def dependence(
    full: Timeline | list[Timeline],
    variants: list[Timeline],
    level: float = 0.5,
    source: str = "probe",
    alpha: float = 0.01,
    yardstick: str = "blind",
) -> list[Dependence]:
    """Verdicts for every (Y, X) where X has a knock-out or knock-in variant; Y is a primitive's
    onset or a strategy switch (``<primitive>:<S>><S'>``, timed like onsets). With several full
    runs (a sweep over seeds) each variant pairs with the full run of its own seed, and the
    paired members of all seeds are pooled. Every variant's progress is measured on its full
    run's baselines (one yardstick: an onset shift measures the model, not a changed baseline)."""
    fulls = full if isinstance(full, list) else [full]
    runs = full_runs_by_seed(fulls)

    def events(timeline: Timeline, baselines=None) -> dict[str, list[Onset]]:
        """Each primitive's onsets and each strategy switch (analysis/strategies.py)."""
        onsets = primitive_onsets(
            timeline, level=level, source=source, yardstick=yardstick, baselines=baselines
        )
        return {**onsets, **run_switches(timeline)}

    full_by_seed = {seed: events(t) for seed, t in runs.items()}
    baselines_by_seed = {seed: t.baselines(yardstick) for seed, t in runs.items()}
    first = next(iter(full_by_seed.values()))
    first_baselines = next(iter(baselines_by_seed.values()))
    by_x: dict[str, dict[str, list[tuple[dict, dict]]]] = {}  # x -> kind -> [(full onsets, variant onsets)]
    emptied: dict[str, dict[str, str]] = {}  # x -> primitives its knock-out leaves unable to fire -> tokens
    for timeline in variants:
        kind, primitives = variant_of(timeline)
        if kind in ("full", "mechanism"):  # mechanism variants: mechanism_effects
            continue
        onsets = events(timeline, baselines_by_seed.get(seed_of(timeline), first_baselines))
        if kind == "knockin":  # the first phase holds X and the category fallback (Language.only)
            first_phase = primitives + [n for n, k in timeline.primitive_kinds.items() if k == "category"]
            onsets = from_switch(onsets, switch_step_of(timeline), first_phase)
        pair = (full_by_seed.get(seed_of(timeline), first), onsets)
        for x in primitives:
            by_x.setdefault(x, {}).setdefault(kind, []).append(pair)
            if kind == "knockout":
                emptied.setdefault(x, {}).update(timeline.empty_primitives)
    full_onsets = first
    runs_empty = {name for t in runs.values() for name in t.empty_primitives}
    results = []
    for x, kinds in by_x.items():
        # Y that this knock-out (not the full language already) leaves unable to fire, with the
        # tokens it lacks: listed even where the yardstick cannot measure Y in the full run
        untestable = {y: lacks for y, lacks in emptied.get(x, {}).items() if y not in runs_empty}
        for y in list(full_onsets) + [y for y in untestable if y not in full_onsets]:
            if y == x:
                continue
            if y in untestable:
                results.append(Dependence(y, x, None, None, UNTESTABLE, lacks=untestable[y]))
                continue
            shifts = {}
            for kind, pairs in kinds.items():
                pairs = [(a, b) for a, b in pairs if y in a and y in b]
                if pairs:
                    shifts[kind] = onset_shift(
                        [o for a, _ in pairs for o in a[y]], [o for _, b in pairs for o in b[y]]
                    )
            out, into = shifts.get("knockout"), shifts.get("knockin")
            hindered = (
                out is not None
                and out.n_units > 0
                and (out.blocked > out.n_units / 2 or (out.p < alpha and out.median > 0))
            )
            helped = into is not None and into.p < alpha and into.median < 0
            verdict = (
                "Y needs X"
                if hindered and helped
                else "Y is delayed by removing X"
                if hindered
                else "no evidence"
            )
            results.append(Dependence(y, x, out, into, verdict))
    return results


@dataclass(frozen=True)
class MechanismEffect:
    """What suppressing a mechanism did to primitive Y, against the full run (paired members).

    ``released_at``: the step the last of the variant's interventions ends (None: one lasts to
    the end of the run). ``formed``: members whose onset was reached by the last step;
    ``formed_after_release``: of those, the ones whose onset came after the release. Onset
    medians are over the members where Y formed (NaN where none did). ``final_excess``: the
    median over members of Y's probe excess at the last step (nats), the suppress-then-release
    effect on the final model (Chen et al. 2024) read per primitive.
    """

    y: str
    variant: str
    shift: Shift
    n_members: int
    last_step: int
    formed: int
    onset_median: float
    full_formed: int
    full_onset_median: float
    released_at: int | None
    formed_after_release: int
    final_excess: float
    full_final_excess: float
    verdict: str


def interventions_of(timeline: Timeline) -> list[dict]:
    return list(config_section(timeline, "mechanism").get("interventions") or [])


def released_at(interventions: list[dict]) -> int | None:
    """When the last intervention ends; None where one lasts to the end of the run."""
    ends = [i.get("to_step") for i in interventions]
    return None if not ends or any(e is None for e in ends) else max(ends)


def _final_excess(timeline: Timeline, primitive: str) -> float:
    name = f"probe_excess/{primitive}"
    if name not in timeline.names(name):
        return math.nan
    values = timeline.values(name)  # (steps, members)
    return float(np.median(values[-1]))


def _median_onset(onsets: list[Onset]) -> float:
    formed = [o.step for o in onsets if not o.censored]
    return float(np.median(formed)) if formed else math.nan


def mechanism_effects(
    full: list[Timeline],
    variants: list[Timeline],
    level: float = 0.5,
    source: str = "probe",
    alpha: float = 0.01,
    yardstick: str = "blind",
) -> list[MechanismEffect]:
    """Per mechanism variant and primitive Y: how many members formed Y, when, and the onset
    shift against the full run of the same seed (on its baselines).

    Verdicts, for a variant never released: "Y needs V" where Y formed in at most half the
    members but in more than half of the full run's; "Y is delayed by V" where the paired shift
    is positive at Holm-free alpha; else "no evidence". For a released variant: "Y formed after
    the release" where most members that formed it did so after ``released_at``, "Y formed
    during V" where most formed it before, "Y never formed" where none did.
    """
    fulls = full_runs_by_seed(full)
    results = []
    for timeline in variants:
        kind, (name,) = variant_of(timeline)
        if kind != "mechanism":
            continue
        reference = fulls.get(seed_of(timeline), next(iter(fulls.values())))
        full_onsets = primitive_onsets(reference, level=level, source=source, yardstick=yardstick)
        onsets = primitive_onsets(
            timeline,
            level=level,
            source=source,
            yardstick=yardstick,
            baselines=reference.baselines(yardstick),
        )
        release = released_at(interventions_of(timeline))
        last = int(timeline.steps("every_step")[-1])
        for y, per_member in onsets.items():
            if y not in full_onsets:
                continue
            shift = onset_shift(full_onsets[y], per_member)
            formed = sum(not o.censored for o in per_member)
            full_formed = sum(not o.censored for o in full_onsets[y])
            after = sum(not o.censored and o.step > release for o in per_member) if release is not None else 0
            n = len(per_member)
            if release is None:
                if formed <= n / 2 < full_formed:
                    verdict = f"{y} needs {name}"
                elif shift.n_units and shift.p < alpha and shift.median > 0:
                    verdict = f"{y} is delayed by {name}"
                else:
                    verdict = "no evidence"
            elif not formed:
                verdict = f"{y} never formed"
            else:
                verdict = (
                    f"{y} formed after the release" if after > formed / 2 else f"{y} formed during {name}"
                )
            results.append(
                MechanismEffect(
                    y,
                    name,
                    shift,
                    n,
                    last,
                    formed,
                    _median_onset(per_member),
                    full_formed,
                    _median_onset(full_onsets[y]),
                    release,
                    after,
                    _final_excess(timeline, y),
                    _final_excess(reference, y),
                    verdict,
                )
            )
    return results


def mechanism_sentences(effects: list[MechanismEffect], variants: list[Timeline]) -> list[str]:
    """One sentence per (Y, suppressed variant) whose verdict is "needs" or "delayed", with the
    numbers of the variants that release the same interventions: "induction needs prev-token:
    suppressed, it formed in 0 of 8 members within 1500 steps; released at 400, it formed at a
    median of 520 (unsuppressed: 160)"."""
    without_end = {}
    for timeline in variants:
        kind, (name,) = variant_of(timeline)
        if kind == "mechanism":
            without_end[name] = [
                {k: v for k, v in i.items() if k != "to_step"} for i in interventions_of(timeline)
            ]
    sentences = []
    for e in effects:
        if e.released_at is not None or e.verdict == "no evidence":
            continue
        text = f"{e.verdict}: suppressed, it formed in {e.formed} of {e.n_members} members"
        text += f" within {e.last_step} steps"
        if e.formed:
            text += f" (median onset {e.onset_median:.0f})"
        for r in effects:
            if (
                r.y == e.y
                and r.released_at is not None
                and without_end.get(r.variant) == without_end.get(e.variant)
            ):
                text += (
                    f"; released at {r.released_at} ({r.variant}), it formed in {r.formed} of {r.n_members}"
                )
                if r.formed:
                    text += f", at a median of {r.onset_median:.0f}"
        text += f" (unsuppressed: formed in {e.full_formed} of {e.n_members}"
        text += f", median onset {e.full_onset_median:.0f})." if e.full_formed else ")."
        sentences.append(text)
    return sentences
