"""Stages of training: the latent-state model recovers planted states, boundaries and detours
(issue: Stages of training)."""

import functools
import math

import numpy as np
import pytest

from analysis.stages import StageData, fit_stages, on_grid

N_BINS = 100


def planted_trajectories(seed, n_seq=6, n_feat=4, n_states=4, detour=None):
    """Sequences that move through ``n_states`` states in order (each its own boundaries, at
    least 8 bins apart), Gaussian noise of unit variance around well-separated state means.
    ``detour`` (state, sequences): only those sequences pass through that state."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, size=(n_states, n_feat))
    while min(np.linalg.norm(means[i] - means[j]) for i in range(n_states) for j in range(i)) < 4:
        means = rng.normal(0, 3, size=(n_states, n_feat))
    values, boundaries = [], []
    for sequence in range(n_seq):
        path = list(range(n_states))
        if detour is not None and sequence not in detour[1]:
            path.remove(detour[0])
        while True:
            cuts = np.sort(rng.choice(np.arange(10, N_BINS - 10), len(path) - 1, replace=False))
            if np.diff(cuts).min(initial=99) >= 8:
                break
        state = np.array(path)[np.searchsorted(cuts, np.arange(N_BINS), side="right")]
        values.append(means[state] + rng.normal(0, 1, size=(N_BINS, n_feat)))
        boundaries.append(cuts)
    steps = np.expm1(np.linspace(0.1, 9.0, N_BINS))
    data = StageData(
        steps, np.stack(values), [f"f{i}" for i in range(n_feat)], [str(i) for i in range(n_seq)]
    )
    return data, boundaries


def test_bic_picks_four_states_and_boundaries_land_within_two_percent():
    """20 seeds of a known 4-state model: BIC picks 4 in at least 18, and at least 90% of the
    planted boundaries have a Viterbi boundary within 2% of the run (2 of 100 bins)."""
    picks, hits, total = [], 0, 0
    for seed in range(20):
        data, planted = planted_trajectories(seed)
        fit = fit_stages(data, range(2, 7), restarts=4, seed=seed, n_iter=100)
        picks.append(fit.n_states)
        for sequence, cuts in enumerate(planted):
            found = np.flatnonzero(np.diff(fit.states[sequence])) + 1
            for cut in cuts:
                total += 1
                hits += bool(len(found)) and int(np.abs(found - cut).min()) <= 0.02 * N_BINS
    assert picks.count(4) >= 18, picks
    assert hits >= 0.9 * total, (hits, total)


def test_states_are_numbered_in_training_order_and_describe_their_changes():
    data, _ = planted_trajectories(3)
    fit = fit_stages(data, range(2, 7), restarts=4)
    assert fit.n_states == 4
    assert (fit.states[:, 0] == 0).all() and (fit.states[:, -1] == 3).all()
    assert [(t.before, t.after) for t in fit.transitions] == [(0, 1), (1, 2), (2, 3)]
    assert all(t.n_sequences == 6 for t in fit.transitions)
    # the feature that changes most at a transition is the one whose planted mean moves most
    means = np.stack([data.values[:, :, :][fit.states == s].mean(axis=0) for s in range(4)])
    for t in fit.transitions:
        moved = np.abs((means[t.after] - means[t.before]) / data.values.reshape(-1, 4).std(axis=0))
        assert t.top_features[0][0] == f"f{int(np.argmax(moved))}"
    np.testing.assert_allclose(fit.transition_matrix.sum(axis=1), 1.0)
    assert not fit.detours


def test_a_state_only_some_members_visit_is_named_a_detour():
    data, _ = planted_trajectories(7, n_seq=8, n_states=5, detour=(2, [1, 4]))
    fit = fit_stages(data, range(2, 8), restarts=4)
    assert fit.n_states == 5
    assert list(fit.detours.values()) == [[1, 4]], fit.detours


def test_on_grid_averages_bins_and_interpolates_empty_ones():
    edges = np.log1p(np.array([0.0, 9.0, 99.0, 999.0, 9999.0]))
    steps = np.array([0, 5, 500, 600])
    values = np.array([1.0, 3.0, 10.0, 20.0])[:, None]
    got = on_grid(steps, values, edges)[:, 0]
    centre = (edges[1] + edges[2]) / 2  # an empty bin: interpolated in log-step at its centre
    between = np.interp(centre, np.log1p(steps), values[:, 0])
    assert got.tolist() == pytest.approx([2.0, between, 15.0, 20.0])
    assert 3.0 < between < 10.0


def test_essential_dynamics_pca_recovers_a_planted_plane_and_keeps_distances():
    """Outputs that move along a curve in a 2-D plane of a 1000-dimensional space: two components
    explain all the variance, and the coordinates keep every pairwise distance (a rotation)."""
    from analysis.essential_dynamics import principal_trajectory

    rng = np.random.default_rng(0)
    t = np.linspace(0, 3, 24)
    curve = np.stack([np.stack([np.cos(t) * (1 + m), np.sin(2 * t) + m], axis=-1) for m in range(3)])
    plane = np.linalg.qr(rng.normal(size=(1000, 2)))[0].T  # (2, 1000), orthonormal rows
    outputs = curve @ plane + 5.0  # (member, snapshot, feature), offset: the PCA centres
    coords, explained = principal_trajectory(outputs, n_components=3)
    assert explained[:2].sum() == pytest.approx(1.0, abs=1e-9) and explained[2] < 1e-9
    flat, planted = coords[..., :2].reshape(-1, 2), curve.reshape(-1, 2)
    distance = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(distance(flat), distance(planted), atol=1e-9)


def test_snapshot_outputs_are_the_models_centred_log_probabilities(tmp_path):
    """The outputs at a snapshot equal an independent forward pass of the weights stored in it."""
    import torch
    import yaml

    from analysis.essential_dynamics import INPUT_SEED, snapshot_outputs
    from devinterp.cli.main import main
    from devinterp.language import parse_language
    from devinterp.model import ModelConfig, TensorTransformer
    from devinterp.store.timeline import load_timeline
    from tests.conftest import ROOT

    assert (
        main(
            [
                "fit",
                "--config",
                str(ROOT / "tests/data/tiny.yaml"),
                "--run.root",
                str(tmp_path),
                "--run.wandb_mode",
                "disabled",
                "--trainer.max_steps",
                "12",
                "--timeline.n_snapshots",
                "4",
            ]
        )
        == 0
    )
    timeline = load_timeline(next(tmp_path.glob("*/timeline.h5")))
    steps, outputs = snapshot_outputs(timeline, n_sequences=3)
    assert list(steps) == sorted(timeline.snapshot_steps[timeline.snapshot_steps >= 0])
    config = yaml.safe_load(timeline.meta["config"])["model"]
    model = TensorTransformer(
        ModelConfig(**{k: v for k, v in config.items() if k in ModelConfig.__dataclass_fields__})
    )
    slot = int(np.flatnonzero(timeline.snapshot_steps == steps[-1])[0])
    _, weights = timeline.snapshot(slot)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    language = parse_language(yaml.safe_load(timeline.meta["language_spec"]))
    tokens = torch.from_numpy(language.sample(3, model.cfg.n_ctx, INPUT_SEED).tokens)
    with torch.no_grad():
        logits = model(tokens.expand(model.cfg.n_members, -1, -1)).double()
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    want = (logp - logp.mean(dim=-1, keepdim=True)).reshape(model.cfg.n_members, -1).numpy()
    np.testing.assert_allclose(outputs[:, -1], want, rtol=1e-6, atol=1e-9)
    # the report's stages section, its figures, and --no-stages
    from analysis.report import write_report

    report = write_report([tmp_path], tmp_path / "analysis").read_text()
    assert "## Stages of training" in report and "BIC picks" in report and "Essential dynamics" in report
    header = report.splitlines()[2]  # the run at the top: its steps, members and model
    assert header.startswith("Run tiny: 12 steps, 2 members; model: n_layers 1, n_heads 2, d_model 16")
    assert (tmp_path / "analysis" / "stages.png").is_file()
    assert (tmp_path / "analysis" / "essential_dynamics.png").is_file()
    assert "## Stages" not in write_report([tmp_path], tmp_path / "bare", stages=False).read_text()
    # the grid and the state counts BIC is offered are the caller's (devinterp analyze --stage-bins,
    # --max-states); a count at the top of the range is said to be a lower bound
    one = write_report([tmp_path], tmp_path / "one", stage_bins=6, max_states=1).read_text()
    assert "6 log-step bins" in one and "BIC picks **1 states** (BIC by state count: 1:" in one
    assert "(`--max-states` offers more)" in one


def switch_timeline(switch: int | None, members=10, last=500, seed=0):
    """A timeline shaped like a knock-in run: "early" is learned at step ~30 in both runs; with a
    switch at step ``switch``, "late" appears in the data only then and its progress rises within
    ~15 steps from a plateau below the yardstick (as the knocked-in run's skip-trigrams do);
    without one, "late" is learned smoothly around step 60. A weight norm grows throughout.
    Weight rows every step, probe rows on a log schedule (16 per doubling), as a run writes."""
    from pathlib import Path

    import yaml

    from devinterp.store.schema import MetricInfo
    from devinterp.store.timeline import Group, Timeline

    rng = np.random.default_rng(seed)
    steps = np.arange(last + 1)
    x = np.log1p(steps)[:, None]
    jitter = lambda scale: rng.normal(0, scale, members)[None]  # noqa: E731
    early = 1 / (1 + np.exp(-(x - math.log(30) - jitter(0.1)) / 0.25))
    if switch is None:
        late = 1 / (1 + np.exp(-(x - math.log(60) - jitter(0.1)) / 0.25))
    else:
        after = np.maximum(steps[:, None] - switch, 0)
        late = np.where(steps[:, None] < switch, -2.0, 1 - 1.0 * np.exp(-after / (15 * (1 + jitter(0.1)))))
    progress = {"early": early, "late": late}
    noisy = lambda v: v + rng.normal(0, 0.02, v.shape)  # noqa: E731
    weight = Group(
        steps,
        np.stack([1 - noisy(p) for p in progress.values()], 1),
        tuple(MetricInfo(f"{n}/r/kl", "weight", n, "r", 1.0, 0.0) for n in progress),
    )
    probe_steps = np.unique(np.round(2 ** np.arange(0, math.log2(last + 1), 1 / 16))).astype(int)
    probe = Group(
        probe_steps,
        np.stack([1 - noisy(p[probe_steps]) for p in progress.values()], 1),
        tuple(MetricInfo(f"probe_excess/{n}", "probe", n, "all", 1.0, 0.0) for n in progress),
    )
    norm = np.log1p(steps)[:, None] * (1 + jitter(0.05))
    diagnostics = Group(
        steps[::10],
        noisy(norm[::10])[:, None],
        (MetricInfo("model/L0H0/ov_norm", "diagnostic", "model", "L0H0"),),
    )
    return Timeline(
        Path(f"switch{switch}.h5"),
        {"every_step": weight, "probe": probe, "diagnostics": diagnostics},
        {"config": yaml.safe_dump({"data": {}})},
        ("start", "early", "late"),
    )


def nearest_boundary(fit, step: float, sharp_only: bool) -> np.ndarray:
    """(sequence,) the log-step distance from ``step`` to each sequence's nearest (sharp) boundary."""
    found = [
        [b.step for b in fit.boundaries if b.sequence == s and (b.sharp or not sharp_only)]
        for s in range(len(fit.states))
    ]
    return np.array([min((abs(math.log1p(b) - math.log1p(step)) for b in f), default=np.inf) for f in found])


@functools.cache
def no_switch_fit():
    from analysis.stages import fit_stages, stage_data

    return fit_stages(stage_data([switch_timeline(None)]))


@pytest.mark.parametrize("switch", [120, 350])
def test_a_curriculum_switch_puts_a_sharp_boundary_within_a_tenth_of_a_log_step(switch):
    """A planted switch: a sharp state boundary within 0.1 log-steps of it in at least 90% of
    the members; the same language with no switch has no sharp boundary anywhere. Its plain
    boundaries may fall near the switch step: the HMM also cuts the smooth growth of the weight
    norm into states, wherever the fit puts them."""
    from analysis.stages import fit_stages, stage_data

    switched = fit_stages(stage_data([switch_timeline(switch)]))
    near = nearest_boundary(switched, switch, sharp_only=True)
    assert (near <= 0.1).mean() >= 0.9, near
    control = no_switch_fit()
    assert control.boundaries and not any(b.sharp for b in control.boundaries), [
        b.jump for b in control.boundaries
    ]


def test_a_state_count_that_cannot_be_fitted_is_listed_with_its_reason(monkeypatch):
    """A fit that fails in every restart, and a count the data is too short for, are named with
    their reasons, never dropped silently; the largest count fitted is not called the largest tried."""
    from hmmlearn.hmm import GaussianHMM

    fit_one = GaussianHMM.fit

    def failing_for_three(self, X, lengths=None):
        if self.n_components == 3:
            raise ValueError("startprob_ must sum to 1 (got nan)")
        return fit_one(self, X, lengths)

    monkeypatch.setattr(GaussianHMM, "fit", failing_for_three)
    data, _ = planted_trajectories(3, n_seq=1)
    short = StageData(data.steps[:9], data.values[:, :9], data.features, data.sequences)  # 9 rows
    fit = fit_stages(short, range(1, 6), restarts=2)
    assert sorted(fit.bic) == [1, 2, 4]
    assert fit.failed == {
        3: "every one of 2 restarts failed (startprob_ must sum to 1 (got nan))",
        5: "not tried: it needs at least 10 rows, the data has 9",
    }
