"""Which components carry which primitive, from the timeline group ``attribution``, and reuse.

The group holds, per token-level rule and diagnostics step, the exact split of the rule's
expected centred logit over the direct path and every head (devinterp/metrics/attribution.py). Here:

- a component's *share* of a rule: its part over the sum of the absolute parts of every
  component (so shares lie in [-1, 1], their absolute values sum to 1, and a negative share is
  a component pushing against the rule's output); a primitive's share: the mean over its rules;
  summaries take the median over members;
- a primitive's *mass*: its rules' summed absolute parts (mean over rules), the size of what is
  being shared out;
- a component *serves* a primitive where its share is at least ``threshold`` (0.2 by default:
  a fifth of the logit's attribution mass) *and* the primitive's mass is at least
  ``MASS_FRACTION`` (10%) of its final mass in that member: early in training every part is
  tiny and a head can hold a large share of almost nothing (a head "served" induction from step
  38 against an onset of 432); its *reuse index* is how many primitives it serves;
- it *starts serving* a primitive at the first diagnostics step from which it serves it to the
  end of the run (None: it never settles there).

Members are separate models whose heads carry no common labels (member 0's induction head may be
L1H2, member 1's L1H0), so serving, reuse and onsets are per member; a median over members per
head would blur them. Summaries count members.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devinterp.store.timeline import Timeline

THRESHOLD = 0.2
MASS_FRACTION = 0.1  # serving needs at least this fraction of the primitive's final mass
FIGURE_FRACTIONS = (0.1, 0.5, 0.9)  # attribution.png shows where the mass first reaches these


@dataclass(frozen=True)
class ComponentShares:
    steps: np.ndarray  # (N,)
    primitives: list[str]
    components: list[str]  # "direct", "L0H0", ...
    shares: np.ndarray  # (N, primitive, component, member)
    mass: np.ndarray  # (N, primitive, member): the absolute parts' sum, mean over the rules

    def median(self) -> np.ndarray:
        """(N, primitive, component): the median over members."""
        return np.median(self.shares, axis=-1)

    def serving(self, threshold: float = THRESHOLD) -> np.ndarray:
        """(N, primitive, component, member) bool: the share is at least ``threshold`` and the
        primitive's mass at least MASS_FRACTION of its final mass in that member."""
        grown = self.mass >= MASS_FRACTION * self.mass[-1:]  # (N, P, M)
        return (self.shares >= threshold) & grown[:, :, None, :]

    def mass_steps(self, member: int, fractions=FIGURE_FRACTIONS) -> list[int]:
        """Step indices where the member's total mass (over primitives) first reaches each
        fraction of its final value: the moments the figure shows."""
        total = self.mass[:, :, member].sum(1)  # (N,)
        return sorted({int(np.argmax(total >= f * total[-1])) for f in fractions})


def rule_shares(timeline: Timeline) -> tuple[list[str], list[str], np.ndarray, np.ndarray] | None:
    """Per rule (not averaged into primitives): rule names (``<primitive>/<rule>``), components,
    shares (N, rule, component, member) and mass (N, rule, member); None without the group."""
    group = timeline.groups.get("attribution")
    if group is None:
        return None
    rules = list(dict.fromkeys(n.rsplit("/", 1)[0] for n in group.names if n.endswith("/direct")))
    components = ["direct"] + sorted(
        {n.rsplit("/", 1)[1] for n in group.names if "<-" not in n and not n.endswith("/direct")},
        key=lambda c: (int(c[1 : c.index("H")]), int(c[c.index("H") + 1 :])),
    )
    index = {n: i for i, n in enumerate(group.names)}
    parts = np.stack(
        [np.stack([group.values[:, index[f"{rule}/{c}"]] for c in components], 1) for rule in rules], 1
    )  # (N, R, C, M)
    mass = np.abs(parts).sum(2, keepdims=True)
    shares = np.divide(parts, mass, out=np.zeros_like(parts), where=mass > 0)
    return [r.removeprefix("attr/") for r in rules], components, shares, mass[:, :, 0]


def component_shares(timeline: Timeline) -> ComponentShares | None:
    """Shares and mass per primitive and component at every attribution step; None without the
    group."""
    found = rule_shares(timeline)
    if found is None:
        return None
    rules, components, per_rule, rule_mass = found
    by_primitive: dict[str, list[int]] = {}
    for r, rule in enumerate(rules):
        by_primitive.setdefault(rule.split("/")[0], []).append(r)
    primitives = list(by_primitive)
    shares = np.stack([per_rule[:, by_primitive[p]].mean(1) for p in primitives], 1)  # (N, P, C, M)
    mass = np.stack([rule_mass[:, by_primitive[p]].mean(1) for p in primitives], 1)  # (N, P, M)
    steps = timeline.groups["attribution"].steps
    return ComponentShares(steps, primitives, components, shares, mass)


def reuse_index(
    shares: ComponentShares, member: int, threshold: float = THRESHOLD, at: int = -1
) -> dict[str, list[str]]:
    """Component -> the primitives it serves in ``member`` at step index ``at``."""
    serves = shares.serving(threshold)[at, :, :, member]  # (P, C)
    return {
        c: [p for i, p in enumerate(shares.primitives) if serves[i, j]]
        for j, c in enumerate(shares.components)
    }


def serving_onsets(
    shares: ComponentShares, member: int, threshold: float = THRESHOLD
) -> dict[tuple[str, str], int | None]:
    """(component, primitive) -> in ``member``, the first step from which the component serves
    the primitive to the last step; None where it does not serve it at the last step."""
    onsets = {}
    serving = shares.serving(threshold)
    for i, p in enumerate(shares.primitives):
        for j, c in enumerate(shares.components):
            above = serving[:, i, j, member]
            if not above[-1]:
                onsets[c, p] = None
                continue
            below = np.flatnonzero(~above)
            onsets[c, p] = int(shares.steps[below[-1] + 1 if len(below) else 0])
    return onsets


def top_heads(shares: ComponentShares, at: int = -1) -> np.ndarray:
    """(primitive, member): the index into ``components`` of the head (not the direct path) with
    the largest share of each primitive in each member at step index ``at``."""
    return shares.shares[at, :, 1:, :].argmax(1) + 1


@dataclass(frozen=True)
class Reuse:
    """One head serving several primitives in one member, with the step it started serving each."""

    member: int
    component: str
    onsets: dict[str, int]  # primitive -> step


def reused_heads(shares: ComponentShares, threshold: float = THRESHOLD) -> list[Reuse]:
    """Every (member, head) serving at least two primitives at the end, with its serving onsets."""
    out = []
    for member in range(shares.shares.shape[-1]):
        onsets = serving_onsets(shares, member, threshold)
        for component, primitives in reuse_index(shares, member, threshold).items():
            if component != "direct" and len(primitives) >= 2:
                out.append(Reuse(member, component, {p: onsets[component, p] for p in primitives}))
    return out


def source_shares(timeline: Timeline, primitive: str, head: str) -> dict[str, np.ndarray] | None:
    """For a head of layer >= 1: each source's part of the head's part of the primitive's rules,
    summed over the rules (source -> (N, members)); None where the group lacks it."""
    group = timeline.groups.get("attribution")
    if group is None:
        return None
    prefix = f"attr/{primitive}/"
    names = [n for n in group.names if n.startswith(prefix) and f"/{head}<-" in n]
    if not names:
        return None
    out: dict[str, np.ndarray] = {}
    for name in names:
        source = name.rsplit("<-", 1)[1]
        out[source] = out.get(source, 0) + group.values[:, group.names.index(name)]
    return out
