"""Which components carry which primitive, from the timeline group ``attribution``, and reuse.

The group holds, per token-level rule and diagnostics step, the exact split of the rule's
expected centred logit over the direct path and every head (devinterp/attribution.py). Here:

- a component's *share* of a rule: its part over the sum of the absolute parts of every
  component (so shares lie in [-1, 1], their absolute values sum to 1, and a negative share is
  a component pushing against the rule's output); a primitive's share: the mean over its rules;
  summaries take the median over members;
- a component *serves* a primitive where its share is at least ``threshold`` (0.2 by default:
  a fifth of the logit's attribution mass); its *reuse index* is how many primitives it serves;
- it *starts serving* a primitive at the first diagnostics step from which its median share
  stays at or above the threshold to the end of the run (None: it never settles there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.timeline import Timeline

THRESHOLD = 0.2


@dataclass(frozen=True)
class ComponentShares:
    steps: np.ndarray  # (N,)
    primitives: list[str]
    components: list[str]  # "direct", "L0H0", ...
    shares: np.ndarray  # (N, primitive, component, member)

    def median(self) -> np.ndarray:
        """(N, primitive, component): the median over members."""
        return np.median(self.shares, axis=-1)


def component_shares(timeline: Timeline) -> ComponentShares | None:
    """Shares per primitive and component at every attribution step; None without the group."""
    group = timeline.groups.get("attribution")
    if group is None:
        return None
    rules = list(dict.fromkeys(n.rsplit("/", 1)[0] for n in group.names if n.endswith("/direct")))
    components = ["direct"] + sorted(
        {n.rsplit("/", 1)[1] for n in group.names if "<-" not in n and not n.endswith("/direct")},
        key=lambda c: (int(c[1 : c.index("H")]), int(c[c.index("H") + 1 :])),
    )
    index = {n: i for i, n in enumerate(group.names)}
    per_primitive: dict[str, list[np.ndarray]] = {}
    for rule in rules:
        parts = np.stack([group.values[:, index[f"{rule}/{c}"]] for c in components], 1)  # (N, C, M)
        mass = np.abs(parts).sum(1, keepdims=True)
        share = np.divide(parts, mass, out=np.zeros_like(parts), where=mass > 0)
        primitive = rule.split("/")[1]  # attr/<primitive>/<rule>
        per_primitive.setdefault(primitive, []).append(share)
    primitives = list(per_primitive)
    shares = np.stack([np.mean(per_primitive[p], axis=0) for p in primitives], 1)  # (N, P, C, M)
    return ComponentShares(group.steps, primitives, components, shares)


def reuse_index(shares: ComponentShares, threshold: float = THRESHOLD, at: int = -1) -> dict[str, list[str]]:
    """Component -> the primitives it serves at step index ``at`` (median share >= threshold)."""
    median = shares.median()[at]  # (P, C)
    return {
        c: [p for i, p in enumerate(shares.primitives) if median[i, j] >= threshold]
        for j, c in enumerate(shares.components)
    }


def serving_onsets(
    shares: ComponentShares, threshold: float = THRESHOLD
) -> dict[tuple[str, str], int | None]:
    """(component, primitive) -> the first step from which the median share stays at or above
    the threshold to the last step; None where it is below at the last step."""
    median = shares.median()  # (N, P, C)
    onsets = {}
    for i, p in enumerate(shares.primitives):
        for j, c in enumerate(shares.components):
            above = median[:, i, j] >= threshold
            if not above[-1]:
                onsets[c, p] = None
                continue
            below = np.flatnonzero(~above)
            onsets[c, p] = int(shares.steps[below[-1] + 1 if len(below) else 0])
    return onsets


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
