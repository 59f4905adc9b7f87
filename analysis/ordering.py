"""In what order are primitives learned? Paired tests across members (and runs).

For every pair (X, Y) the onsets of X and Y are paired by member (members of one run, and runs
with different seeds, pool the same way: each (run, member) is one unit). Per unit, X is first
if its onset is earlier in log(step + 1). Censoring: a unit where X never formed but Y did has Y
first; where neither formed it carries no information and is left out. Reported per pair:
- the sign test (two-sided binomial on the units that are not ties) and the Wilcoxon
  signed-rank test on the log-step differences (censored onsets at their censoring step, a
  bound that only shrinks the differences);
- P(X first) with a Clopper-Pearson 95% interval;
- Holm's correction across all pairs.
An edge X -> Y is drawn where the Holm-corrected Wilcoxon p-value is below ``alpha``, in the
direction of the median gap; the ordering DAG is the transitive reduction of those edges. The
Wilcoxon test decides because it uses the sizes of the gaps: on synthetic timelines with 16
members and a gap of twice the per-member onset spread it found 98% of planted edges, the sign
test 73% (tests/test_analysis.py). With n units the smallest two-sided p-value of either test
is 2 / 2^n: 8 units reach 0.0078, so alpha = 0.01 needs at least 8.

"No order" is a claim of its own, not a missing edge: X and Y are learned at the same time
within a margin m (default 0.3 log-steps, a factor 1.35 in step) when two one-sided Wilcoxon
tests (TOST, Schuirmann 1987) reject both "the gaps sit at or above +m" and "at or below -m",
Holm-corrected across pairs like the edges. A unit where only one of the two formed counts as a
gap beyond any margin (its true gap is unknown but at least what was seen), so censoring can
never make two primitives look simultaneous. Both tests can reject at once: a gap that is
consistently non-zero but small. Such a pair is ordered (the edge stands) and *close*, never
"no order".

A second signal, reported beside the onset test: the lead-lag of the progress derivatives (the
log-step shift that best aligns d progress / d log step of X with that of Y).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, wilcoxon

from analysis.onset import Onset


@dataclass(frozen=True)
class PairTest:
    """Order of X and Y over paired units."""

    x: str
    y: str
    n_units: int  # units with information (not both censored)
    x_first: int
    y_first: int
    ties: int
    p_x_first: float
    p_x_first_low: float
    p_x_first_high: float
    median_log_gap: float  # median over units of log(t_Y + 1) - log(t_X + 1)
    sign_p: float
    wilcoxon_p: float
    holm_p: float = math.nan  # Holm-corrected Wilcoxon p-value
    edge: str = ""  # "x->y", "y->x" or ""
    equivalence_p: float = 1.0  # TOST: both onsets within +-margin of each other
    equivalence_holm_p: float = math.nan
    same_time: bool = False  # "no order": equivalence_holm_p below alpha and no edge
    close: bool = False  # an edge, and yet the gap lies within +-margin: ordered, but close


@dataclass(frozen=True)
class Ordering:
    pairs: tuple[PairTest, ...]
    edges: tuple[tuple[str, str], ...]  # every significant edge
    dag: tuple[tuple[str, str], ...]  # its transitive reduction
    alpha: float
    margin: float = 0.3  # log-steps, of the "no order" (equivalence) test


def compare(x: str, onsets_x: list[Onset], y: str, onsets_y: list[Onset], margin: float = 0.3) -> PairTest:
    """Paired test of which of X and Y comes first, and of whether they come at the same time
    within ``margin`` log-steps; onsets are paired by position in the lists."""
    if len(onsets_x) != len(onsets_y):
        raise ValueError(f"{x} has {len(onsets_x)} onsets and {y} {len(onsets_y)}: they must pair up")
    gaps, bounds, x_first, y_first, ties = [], [], 0, 0, 0
    for a, b in zip(onsets_x, onsets_y):
        if a.censored and b.censored:
            continue
        gap = math.log(b.step + 1) - math.log(a.step + 1)
        if a.censored:
            gap = min(gap, -1e-12)  # X never formed: Y first, by at least what we saw
        elif b.censored:
            gap = max(gap, 1e-12)
        gaps.append(gap)
        bounds.append(gap if not (a.censored or b.censored) else math.copysign(math.inf, gap))
        if gap > 0:
            x_first += 1
        elif gap < 0:
            y_first += 1
        else:
            ties += 1
    decided = x_first + y_first
    if decided:
        test = binomtest(x_first, decided, 0.5)
        sign_p = float(test.pvalue)
        ci = test.proportion_ci(confidence_level=0.95, method="exact")
        p_first, low, high = x_first / decided, float(ci.low), float(ci.high)
    else:
        sign_p, p_first, low, high = 1.0, math.nan, 0.0, 1.0
    nonzero = [g for g in gaps if g != 0]
    wilcoxon_p = float(wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else 1.0
    return PairTest(
        x,
        y,
        len(gaps),
        x_first,
        y_first,
        ties,
        p_first,
        low,
        high,
        float(np.median(gaps)) if gaps else math.nan,
        sign_p,
        wilcoxon_p,
        equivalence_p=equivalence_p(bounds, margin),
    )


def equivalence_p(gaps: list[float], margin: float) -> float:
    """TOST with Wilcoxon signed-rank tests: the larger of the one-sided p-values of "the gaps
    lie below +margin" and "above -margin" (small: the median gap is within +-margin). An
    infinite gap (a censored unit) ranks beyond every finite one."""
    finite = np.asarray(gaps, dtype=np.float64)
    if len(finite) < 2:
        return 1.0
    big = 1e6 * (1 + np.abs(finite[np.isfinite(finite)]).max(initial=0.0))
    finite = np.clip(finite, -big, big)
    p_values = []
    for shifted, alternative in ((finite - margin, "less"), (finite + margin, "greater")):
        nonzero = shifted[shifted != 0]
        p_values.append(float(wilcoxon(nonzero, alternative=alternative).pvalue) if len(nonzero) else 1.0)
    return max(p_values)


def smallest_wilcoxon_p(n_untied: int) -> float:
    """The smallest two-sided p the Wilcoxon signed-rank test can give on ``n_untied`` nonzero
    paired differences: every one of one sign, under the exact null distribution, 2 / 2^n."""
    return 1.0 if n_untied < 2 else min(1.0, 2.0 ** (1 - n_untied))


def smallest_holm_p(n_untied: int, n_pairs: int) -> float:
    """The smallest Holm-corrected p any pair can reach: Holm multiplies the smallest p by the
    number of pairs."""
    return min(1.0, max(1, n_pairs) * smallest_wilcoxon_p(n_untied))


def units_needed(n_pairs: int, alpha: float) -> int:
    """The fewest untied units whose smallest Holm-corrected p is below ``alpha``."""
    n = 2
    while smallest_holm_p(n, n_pairs) >= alpha:
        n += 1
    return n


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    order = np.argsort(p_values)
    m = len(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, (m - rank) * p_values[index])
        adjusted[index] = min(1.0, running)
    return adjusted.tolist()


def transitive_reduction(edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop every edge a -> c implied by a longer path a -> ... -> c (edges must form a DAG)."""
    nodes = sorted({n for edge in edges for n in edge})
    children = {n: {b for a, b in edges if a == n} for n in nodes}

    def reachable(start: str, skip: tuple[str, str]) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            node = stack.pop()
            for child in children[node]:
                if (node, child) != skip and child not in seen:
                    seen.add(child)
                    stack.append(child)
        return seen

    return [(a, b) for a, b in edges if b not in reachable(a, skip=(a, b))]


def infer_ordering(onsets: dict[str, list[Onset]], alpha: float = 0.01, margin: float = 0.3) -> Ordering:
    """Every pair of primitives (or metrics) tested; significant edges and their DAG, and the
    pairs learned at the same time within ``margin`` log-steps."""
    names = list(onsets)
    pairs = [compare(x, onsets[x], y, onsets[y], margin) for x, y in itertools.combinations(names, 2)]
    adjusted = holm([p.wilcoxon_p for p in pairs]) if pairs else []
    same = holm([p.equivalence_p for p in pairs]) if pairs else []
    tested, edges = [], []
    for pair, p_holm, p_same in zip(pairs, adjusted, same):
        edge = ""
        if p_holm < alpha and pair.median_log_gap != 0:
            edge = "x->y" if pair.median_log_gap > 0 else "y->x"
            edges.append((pair.x, pair.y) if edge == "x->y" else (pair.y, pair.x))
        within = p_same < alpha
        fields = {
            "holm_p": p_holm,
            "edge": edge,
            "equivalence_holm_p": p_same,
            "same_time": within and not edge,
            "close": within and bool(edge),
        }
        tested.append(PairTest(**{**pair.__dict__, **fields}))
    return Ordering(tuple(tested), tuple(edges), tuple(transitive_reduction(edges)), alpha, margin)


def lead_lag(
    steps: np.ndarray,
    progress_x: np.ndarray,
    progress_y: np.ndarray,
    n_points: int = 100,
    max_shift: int = 30,
) -> float:
    """How far, in log(step + 1), Y's learning lags X's: the shift maximising the correlation of
    d progress_X with d progress_Y shifted, both interpolated onto a grid evenly spaced in
    log(step + 1). Positive: X leads. progress (N,) for one member or (N, members), averaged."""
    x = np.log(np.asarray(steps, dtype=np.float64) + 1)
    grid = np.linspace(x[0], x[-1], n_points)
    mean = lambda p: np.asarray(p, dtype=np.float64).reshape(len(x), -1).mean(1)  # noqa: E731
    dx, dy = np.diff(np.interp(grid, x, mean(progress_x))), np.diff(np.interp(grid, x, mean(progress_y)))
    best, best_corr = 0, -np.inf
    for shift in range(-max_shift, max_shift + 1):
        a = dx[max(0, -shift) : len(dx) - max(0, shift)]
        b = dy[max(0, shift) : len(dy) - max(0, -shift)]
        if len(a) < 3 or a.std() == 0 or b.std() == 0:
            continue
        corr = float(np.corrcoef(a, b)[0, 1])
        if corr > best_corr:
            best, best_corr = shift, corr
    return best * float(grid[1] - grid[0])
