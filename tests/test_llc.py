"""The LLC estimator recovers known learning coefficients (issue: The learning coefficient).

Known answers: the normal-crossing potential w1^2 w2^4 (lambda 1/4) against an independent
quadrature of the very quantity the sampler targets at finite n_beta and gamma (the tempered,
localised posterior mean); reduced-rank regression against Aoyagi and Watanabe's (2005) formula;
a regular model (lambda = d / 2)."""

from devinterp.threads import available_cores

import math
import os

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from devinterp.llc.sampler import SamplerConfig, default_n_beta, estimate_llc


def normal_crossing_target(n_beta: float, gamma: float) -> float:
    """n_beta E[w1^2 w2^4] under p(w) ~ exp(-n_beta w1^2 w2^4 - gamma |w|^2 / 2), by quadrature.
    Given w2 the density is Gaussian in w1 with variance 1 / (2 n_beta w2^4 + gamma), so the
    w1 integral is closed-form and one 1-D integral over w2 is left."""
    density = lambda w2: np.exp(-gamma * w2**2 / 2) / np.sqrt(n_beta * w2**4 + gamma / 2)  # noqa: E731
    inner = lambda w2: density(w2) * n_beta * w2**4 / (2 * n_beta * w2**4 + gamma)  # noqa: E731
    points = [0.0, n_beta**-0.25]
    top = 12 / math.sqrt(gamma)
    return (
        quad(inner, 0, top, points=points, limit=500)[0] / quad(density, 0, top, points=points, limit=500)[0]
    )


def test_the_quadrature_reproduces_the_published_targets():
    # the values the issue quotes for gamma = 1, approaching lambda = 1/4 as n_beta grows
    got = [normal_crossing_target(n, 1.0) for n in (1e2, 1e4, 1e6)]
    assert got == pytest.approx([0.206, 0.236, 0.246], abs=6e-4)


def crossing_loss(params, step):
    w = params["w"]  # (copy, 2)
    return w[:, 0] ** 2 * w[:, 1] ** 4


NORMAL_CROSSING = [
    pytest.param("sgld", 1e2, 1e-3, 2000, id="sgld-nbeta1e2"),
    pytest.param("rmsprop", 1e4, 1e-3, 2000, id="rmsprop-nbeta1e4"),
    pytest.param("sgld", 1e4, 3e-5, 20000, id="sgld-nbeta1e4", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("sampler, n_beta, eps, burn_in", NORMAL_CROSSING)
def test_the_sampler_recovers_the_tempered_posterior_mean_of_a_normal_crossing(sampler, n_beta, eps, burn_in):
    """Within 3.5 standard errors of the quadrature, the standard error below 5% of it."""
    config = SamplerConfig(
        n_beta=n_beta, eps=eps, gamma=1.0, chains=1000, draws=2 * burn_in, burn_in=burn_in, sampler=sampler
    )
    estimate = estimate_llc(crossing_loss, {"w": torch.zeros(1, 2, dtype=torch.float64)}, config)
    want = normal_crossing_target(n_beta, 1.0)
    (got,), (error,) = estimate.llc, estimate.std_error
    assert error < 0.05 * want
    assert abs(got - want) < 3.5 * error, (got, want, error)
    assert not estimate.diverged.any() and not estimate.below_init.any()


def aoyagi_watanabe(inputs: int, hidden: int, outputs: int, rank: int) -> float:
    """The learning coefficient of reduced-rank regression y = B A x (A: hidden x inputs, B:
    outputs x hidden) at a true map of rank ``rank`` (Aoyagi and Watanabe 2005, Theorem 1)."""
    n, h, m, r = inputs, hidden, outputs, rank
    if m + h < n + r:
        return (h * m - h * r + n * r) / 2
    if n + h < m + r:
        return (h * n - h * r + m * r) / 2
    if m + n < h + r:
        return m * n / 2
    central = 2 * (h + r) * (m + n) - (m - n) ** 2 - (h + r) ** 2
    return (central + (m + n + h + r) % 2) / 8


def test_the_formula_gives_the_cases_worked_by_hand():
    assert aoyagi_watanabe(1, 1, 1, 0) == 0.5  # K = (ab)^2: lambda 1/2
    assert aoyagi_watanabe(1, 1, 1, 1) == 0.5  # ab = c != 0: a one-dimensional fibre
    assert aoyagi_watanabe(5, 1, 2, 1) == 3.0  # rank one: 7 weights, 6 directions that matter


@pytest.mark.parametrize("inputs, hidden, outputs, rank", [(3, 2, 3, 1), (4, 3, 2, 1), (2, 2, 2, 0)])
def test_reduced_rank_regression_within_twenty_percent_of_aoyagi_watanabe(inputs, hidden, outputs, rank):
    """Population loss K = |BA - C|_F^2 / 2 (x standard normal), at the deepest true point (the
    spare hidden units' weights zero); RMSProp-SGLD at n_beta 1e4, gamma 1."""
    generator = torch.Generator().manual_seed(1)
    A = torch.zeros(1, hidden, inputs, dtype=torch.float64)
    B = torch.zeros(1, outputs, hidden, dtype=torch.float64)
    A[0, :rank] = torch.randn(rank, inputs, generator=generator, dtype=torch.float64)
    B[0, :, :rank] = torch.randn(outputs, rank, generator=generator, dtype=torch.float64)
    target = (B @ A)[0]

    def loss(params, step):
        return 0.5 * ((params["B"] @ params["A"] - target) ** 2).sum(dim=(1, 2))

    config = SamplerConfig(
        n_beta=1e4, eps=1e-3, gamma=1.0, chains=200, draws=2000, burn_in=1000, sampler="rmsprop"
    )
    estimate = estimate_llc(loss, {"A": A, "B": B}, config)
    want = aoyagi_watanabe(inputs, hidden, outputs, rank)
    assert estimate.llc[0] == pytest.approx(want, rel=0.2), (estimate.llc, want)
    assert estimate.llc[0] < 0.8 * hidden * (inputs + outputs) / 2  # well below the regular d/2


def test_a_regular_model_is_within_ten_percent_of_half_its_dimension():
    """Linear regression (4 inputs, 3 outputs: d = 12) on 5000 noisy samples, at its least-squares
    fit, minibatches of 500, n_beta 1000, gamma 1."""
    n, din, dout, batch = 5000, 4, 3, 500
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(n, din, generator=generator, dtype=torch.float64)
    Y = X @ torch.randn(dout, din, generator=generator, dtype=torch.float64).T
    Y = Y + torch.randn(n, dout, generator=generator, dtype=torch.float64)
    least_squares = torch.linalg.lstsq(X, Y).solution.T  # (dout, din)

    def loss(params, step):
        W = params["W"]  # (copy, dout, din)
        rows = torch.randint(n, (W.shape[0], batch), generator=torch.Generator().manual_seed(step))
        residual = torch.einsum("cbi,coi->cbo", X[rows], W) - Y[rows]
        return 0.5 * (residual**2).sum(-1).mean(-1)

    config = SamplerConfig(
        n_beta=1e3, eps=1e-3, gamma=1.0, chains=40, draws=1000, burn_in=300, sampler="rmsprop"
    )
    estimate = estimate_llc(loss, {"W": least_squares[None]}, config)
    assert estimate.llc[0] == pytest.approx(din * dout / 2, rel=0.1), estimate.llc


def test_members_are_groups_and_a_mask_freezes_what_it_leaves_out():
    """Two groups at once: K = w1^2 + w2^2 (lambda 1) and, with w2 frozen at w*, only w1 moves
    (lambda 1/2). Exactly n_beta / (n_beta + gamma / 2) per moving direction, times 1/2; eps small
    enough that SGLD's own bias (about eps (2 n_beta + gamma) / 4 of the variance) is 0.5%."""

    def loss(params, step):
        return (params["w"] ** 2).sum(dim=1)

    config = SamplerConfig(n_beta=100.0, eps=1e-4, gamma=1.0, chains=400, draws=2000, burn_in=500)
    init = {"w": torch.zeros(2, 2, dtype=torch.float64)}
    both = estimate_llc(loss, init, config)
    frozen = estimate_llc(loss, init, config, mask={"w": torch.tensor([1.0, 0.0], dtype=torch.float64)})
    per_direction = 0.5 * 100 / (100 + 0.5)
    np.testing.assert_allclose(both.llc, 2 * per_direction, rtol=0.05)
    np.testing.assert_allclose(frozen.llc, per_direction, rtol=0.05)


def test_a_diverged_chain_is_counted_and_left_out_and_a_dip_below_w_star_is_flagged():
    def blows_up(params, step):  # copy 1 of 4 returns inf from the tenth step on
        loss = (params["w"] ** 2).sum(dim=1)
        return torch.where((torch.arange(len(loss)) == 1) & (step >= 10), torch.inf, loss)

    config = SamplerConfig(n_beta=10.0, eps=1e-3, gamma=1.0, chains=4, draws=50)
    estimate = estimate_llc(blows_up, {"w": torch.zeros(1, 2, dtype=torch.float64)}, config)
    assert estimate.diverged.tolist() == [[False, True, False, False]]
    assert np.isnan(estimate.per_chain[0, 1]) and np.isfinite(estimate.llc[0])
    assert estimate.llc[0] == pytest.approx(np.mean(estimate.per_chain[0, [0, 2, 3]]))

    def not_a_minimum(params, step):  # w* = 0 sits on a slope: chains fall below L(w*)
        return ((params["w"] - 1.0) ** 2).sum(dim=1)

    estimate = estimate_llc(not_a_minimum, {"w": torch.zeros(1, 2, dtype=torch.float64)}, config)
    assert estimate.below_init.all() and estimate.llc[0] < 0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("eps", 0.0, "eps: must be a positive number"),
        ("n_beta", -1.0, "n_beta: must be a positive number"),
        ("chains", 0, "chains: must be at least 1"),
        ("sampler", "adam", "sampler: expected 'sgld' or 'rmsprop'"),
    ],
)
def test_bad_hyperparameters_are_named(field, value, message):
    settings = {"n_beta": 10.0, field: value}
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**settings)


def test_default_n_beta_is_b_over_log_b():
    assert default_n_beta(256) == pytest.approx(256 / math.log(256))


def small_model_and_pool(n_members=2, chains=3):
    """A seed-language model of ``n_members`` (random weights, W_O and W_U moved off zero so
    every path is live) and a data pool; the batched model holds members x chains copies."""
    from devinterp.llc.snapshots import DataPool
    from devinterp.model import ModelConfig, TensorTransformer
    from tests.conftest import seed_spec

    spec = seed_spec()
    pool = DataPool.from_spec(spec, 64, 17)
    base = ModelConfig(d_vocab=33, n_ctx=16, n_members=n_members, n_layers=2, n_heads=2, d_model=16, d_head=8)
    members = TensorTransformer(base, seed=3)
    with torch.no_grad():
        for param in members.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    params = {name: p.detach().clone() for name, p in members.named_parameters()}
    batched = TensorTransformer(ModelConfig(**{**base.__dict__, "n_members": n_members * chains}))
    return spec, pool, members, params, batched


@pytest.mark.parametrize("primitive", [None, "induction", "bigram"])
def test_the_batched_loss_is_each_members_own_loss_on_its_batch(primitive):
    """Every copy's loss at w* equals its member's mean cross-entropy over the chosen positions,
    recomputed from a forward pass of that member alone and log-softmax in float64."""
    from devinterp.language import parse_language
    from devinterp.llc.snapshots import Refinement, make_loss

    spec, pool, members, params, batched = small_model_and_pool()
    names = parse_language(spec).label_names
    refinement = Refinement(primitive or "model", label=names.index(primitive) if primitive else None)
    loss = make_loss(batched, pool, refinement, batch_size=4)
    copies = {name: value.repeat_interleave(3, dim=0) for name, value in params.items()}
    got = loss(copies, step=7)
    # the batches the loss drew at step 7, drawn again the same way
    rows = pool.holding(refinement.label)
    picked = rows[torch.randint(len(rows), (6, 4), generator=torch.Generator().manual_seed(7))]
    with torch.no_grad():
        for copy in range(6):
            tokens = pool.tokens[picked[copy]]  # (batch, pos)
            logits = members(tokens[None, :, :-1].expand(2, -1, -1))[copy // 3].double()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
            keep = torch.ones_like(logp, dtype=torch.bool)
            if primitive:
                keep = pool.labels[picked[copy]][:, 1:] == refinement.label
                assert keep.any()  # every batch of a refined chain holds the primitive
            assert float(got[copy]) == pytest.approx(float(-logp[keep].mean()), rel=1e-5)


@pytest.mark.parametrize("primitive", [None, "induction"])
def test_the_loss_at_w_star_read_from_the_pool_equals_a_forward_pass_at_w_star(primitive):
    """``at_anchor`` (the pool's per-position losses at w*, computed once) gives every copy's loss
    at w* on the step's own batch, as the forward pass of the repeated w* does."""
    from devinterp.language import parse_language
    from devinterp.llc.snapshots import Refinement, make_loss

    spec, pool, _, params, batched = small_model_and_pool()
    names = parse_language(spec).label_names
    refinement = Refinement(primitive or "model", label=names.index(primitive) if primitive else None)
    loss = make_loss(batched, pool, refinement, batch_size=4)
    at_anchor = loss.at_anchor(params, sequences_per_pass=10)  # 5 a pass: passes that do not divide the pool
    copies = {name: value.repeat_interleave(3, dim=0) for name, value in params.items()}
    for step in (0, 7, 31):
        with torch.no_grad():
            torch.testing.assert_close(at_anchor(step), loss(copies, step), rtol=1e-5, atol=1e-6)


def test_passes_over_some_copies_give_the_estimate_of_one_pass_over_all():
    from devinterp.llc.snapshots import Refinement, make_loss

    _, pool, _, params, batched = small_model_and_pool()  # 2 members x 3 chains
    loss = make_loss(batched, pool, Refinement("model"), batch_size=4)
    config = SamplerConfig(n_beta=10.0, eps=1e-4, gamma=100.0, chains=3, draws=8)
    whole = estimate_llc(loss, params, config, anchor_loss=loss.at_anchor(params))
    for per_pass in (1, 4):  # six passes of one; two of three (four rounds to even passes)
        parts = estimate_llc(
            loss, params, config, anchor_loss=loss.at_anchor(params), copies_per_pass=per_pass
        )
        np.testing.assert_allclose(parts.per_chain, whole.per_chain, rtol=1e-4)
        np.testing.assert_allclose(parts.loss_trace, whole.loss_trace, rtol=1e-5)


def test_a_head_refined_chain_moves_that_head_only():
    from devinterp.llc.snapshots import HEAD_PARAMETERS, Refinement, head_mask, make_loss

    _, pool, _, params, batched = small_model_and_pool(n_members=1, chains=2)
    loss = make_loss(batched, pool, Refinement("L1H0", head=(1, 0)), batch_size=2)
    calls = []

    def recording(current, step):
        calls.append({name: value.detach().clone() for name, value in current.items()})
        return loss(current, step)

    config = SamplerConfig(n_beta=10.0, eps=1e-3, gamma=1.0, chains=2, draws=5)
    estimate_llc(recording, params, config, mask=head_mask(params, 1, 0))
    seen = calls[-2]  # the chains at the last step (the last call is the loss at w*)
    for name, start in params.items():
        moved = (seen[name] != start.repeat_interleave(2, dim=0)).any(dim=0)  # (...) per entry
        if name not in HEAD_PARAMETERS:
            assert not moved.any(), name
            continue
        own = moved[1, :, 0] if name in ("W_Q", "W_K") else moved[1, 0]
        assert own.all(), name  # every weight of the head moves
        assert moved.sum() == own.sum(), name  # and nothing else


def test_llc_command_writes_a_sidecar_goes_on_where_it_stopped_and_refuses_bad_input(tmp_path, capsys):
    import yaml

    from devinterp.cli.main import main
    from devinterp.llc.snapshots import DataPool, Refinement, snapshot_llc
    from devinterp.store.llc_file import load_llc
    from devinterp.store.timeline import load_timeline
    from tests.conftest import ROOT

    fit = ["fit", "--config", str(ROOT / "tests/data/tiny.yaml"), "--run.root", str(tmp_path)]
    assert (
        main(
            fit + ["--run.wandb_mode", "disabled", "--trainer.max_steps", "12", "--timeline.n_snapshots", "4"]
        )
        == 0
    )
    run = tmp_path / "tiny"
    timeline_bytes = (run / "timeline.h5").read_bytes()
    settings = ["--chains", "2", "--draws", "6", "--burn-in", "0", "--pool-size", "64", "--batch-size", "4"]
    assert main(["llc", str(run), *settings, "--refinements", "model", "L0H1"]) == 0
    first = load_llc(run)
    assert sorted(first) == ["L0H1", "model"] and first["model"]["steps"].tolist() == [0, 1, 5, 12]
    assert first["model"]["llc"].shape == (4, 2) and first["model"]["loss_trace"].shape == (4, 2, 2, 6)
    # the same estimate made directly: the command adds nothing of its own
    timeline = load_timeline(run / "timeline.h5")
    _, weights = timeline.snapshot(int(np.flatnonzero(timeline.snapshot_steps == 12)[0]))
    config = yaml.safe_load(timeline.meta["config"])
    spec = yaml.safe_load(timeline.meta["language_spec"])
    sampler = SamplerConfig(
        n_beta=default_n_beta(4 * (config["data"]["seq_len"] - 1)), eps=1e-4, chains=2, draws=6
    )
    direct = snapshot_llc(
        timeline.meta["config"],
        weights,
        Refinement("model"),
        sampler,
        [0, 1],
        DataPool.from_spec(spec, 64, config["data"]["seq_len"]),
        4,
    )
    np.testing.assert_allclose(first["model"]["llc"][3], direct.llc, rtol=1e-6)
    # a rerun with one more refinement makes only that one and keeps the others as they were
    more = ["--refinements", "model", "L0H1", "induction", "--wandb", "offline"]
    assert main(["llc", str(run), *settings, *more]) == 0
    err = capsys.readouterr().err
    assert "llc: 4 estimates to make (4 snapshots x 3 refinements" in err
    assert "llc: about " in err and " min for all 4 (timed on 8 SGLD steps of the first" in err
    if available_cores() > 1:  # the chains' threads measured as fit's are (devinterp/threads.py)
        assert "llc threads: 1 thread for" in err and "of the fastest kept" in err
    # the curves went to W&B as an analysis segment of the run's group, read back with W&B's reader
    from devinterp.store.wandb_files import history, last_logged_step, records, run_files

    (segment,) = run_files(run / "wandb")
    (described,) = [r["run"] for r in records(segment) if r.get("type") == "run"]
    assert (described["run_group"], described["job_type"]) == ("tiny", "llc")
    rows = history(segment)
    assert [row["trainer/global_step"] for row in rows] == [0, 1, 5, 12]
    second = load_llc(run)
    for name, key in [("model", "llc/model"), ("L0H1", "llc/L0H1"), ("induction", "induction/llc")]:
        kept = second[name]["llc"][3][second[name]["llc"][3] >= 0]  # what the report reads
        assert rows[3][f"{key}_left_out"] == 2 - len(kept)
        if len(kept):
            assert rows[3][key] == pytest.approx(float(np.median(kept)), rel=1e-6)
        else:
            assert key not in rows[3]
    assert "llc/model_iqr" in rows[3] or rows[3]["llc/model_left_out"] == 2
    assert last_logged_step(run / "wandb") is None  # a resume's W&B bookkeeping ignores it
    assert "WANDB_SERVICE" not in os.environ  # W&B's service is gone: no later child process inherits it
    np.testing.assert_array_equal(second["model"]["llc"], first["model"]["llc"])
    assert np.isfinite(second["induction"]["llc"]).all() or second["induction"]["diverged"].any()
    assert (run / "timeline.h5").read_bytes() == timeline_bytes  # the training record untouched
    sidecar = (run / "llc.h5").read_bytes()
    capsys.readouterr()
    for bad, message in [
        (["--steps", "7"], "--steps: no snapshot at step 7 (snapshots at 0, 1, 5, 12)"),
        (["--eps", "0"], "eps: must be a positive number"),
        (["--n-beta", "-1"], "n_beta: must be a positive number"),
        (["--refinements", "L5H0"], "refinements: no 'L5H0' in this run"),
        (["--chains", "3"], "made with other settings (chains 2 there, 3 asked)"),
        (["--eps-for", "induction=0"], "--eps-for: expected NAME=EPS"),
        (["--eps-for", "nope=1e-4"], "--eps-for: expected NAME=EPS"),
        (["--eps-for", "induction=1e-3"], "induction was estimated with eps 0.0001 (step 0), asked 0.001"),
        (["--refinements", "model", "--redo", "induction"], "--redo: 'induction' is not among"),
    ] + (
        [(["--device", "cuda"], "--device: cuda asked for, but torch sees no CUDA")]
        if not torch.cuda.is_available()
        else []
    ):
        argv = ["llc", str(run), *settings, *bad]
        assert main(argv) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert (run / "llc.h5").read_bytes() == sidecar  # nothing written on bad input
    calibrate = ["--calibrate", "--eps-grid", "1e-4", "1e-3", "--n-beta-grid", "10", "100"]
    assert main(["llc", str(run), *settings, *calibrate]) == 0
    printed = capsys.readouterr()
    assert printed.err.count("llc calibrate: model, n_beta") == 4 and "llc calibrate:" in printed.out
    # one refinement's eps, chosen at the file's n_beta (a grid over eps only)
    assert (
        main(
            [
                "llc",
                str(run),
                *settings,
                "--calibrate",
                "--refinements",
                "induction",
                "--eps-grid",
                "1e-4",
                "1e-3",
            ]
        )
        == 0
    )
    assert capsys.readouterr().err.count("llc calibrate: induction, n_beta") == 2
    assert (run / "llc_calibration_induction.png").is_file()
    assert (run / "llc_calibration.png").is_file() and (run / "llc.h5").read_bytes() == sidecar
    # one refinement made again at its own step size, under a progress bar; the others stay
    redo = ["--refinements", "model", "induction", "--redo", "induction", "--eps-for", "induction=5e-5"]
    assert main(["llc", str(run), *settings, *redo]) == 0
    assert "24/24" in capsys.readouterr().err  # 4 estimates x 6 SGLD steps
    third = load_llc(run)
    assert third["induction"]["eps"].tolist() == [5e-5] * 4 and third["model"]["eps"].tolist() == [1e-4] * 4
    np.testing.assert_array_equal(third["model"]["llc"], first["model"]["llc"])
    assert not np.array_equal(third["induction"]["llc"], second["induction"]["llc"], equal_nan=True)
    from analysis.report import write_report

    report = write_report([run], tmp_path / "analysis", stages=False).read_text()
    assert "## Learning coefficient" in report and "| model | 4 |" in report and "| induction | 4 |" in report
    assert "SGLD step sizes: " in report and "induction 5e-05" in report
    assert (tmp_path / "analysis" / "llc.png").is_file()
    from analysis.learning_coefficient import PREVIOUS_TOKEN, head_roles

    roles = head_roles(timeline)  # one layer: no induction circuit, so no previous-token head
    assert {"induction", "bigram", "skip_trigram"} == set(roles) and PREVIOUS_TOKEN not in roles
    assert all(len(heads) == 2 and all(h in ("L0H0", "L0H1") for h in heads) for heads in roles.values())
    empty = tmp_path / "bare"
    assert (
        main(
            fit
            + [
                "--run.name",
                "bare",
                "--run.wandb_mode",
                "disabled",
                "--trainer.max_steps",
                "2",
                "--timeline.n_snapshots",
                "0",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["llc", str(empty)]) == 2 and "no weight snapshots" in capsys.readouterr().err


def test_role_curves_follow_each_members_own_head_against_its_heads_with_no_role():
    from analysis.learning_coefficient import OTHERS, role_curves

    steps = np.array([0, 10, 100])
    value = {"L0H0": 1.0, "L0H1": 2.0, "L1H0": 3.0, "L1H1": 4.0}
    # member 1's values are ten times member 0's; one snapshot of L1H1 not estimated yet
    estimates = {head: {"steps": steps, "llc": np.array([[v, 10 * v]] * 3)} for head, v in value.items()}
    estimates["L1H1"]["llc"][0] = np.nan
    roles = {"induction": ["L1H0", "L1H1"], "previous-token": ["L0H1", "L0H0"], "bigram": ["L9H9", "L0H0"]}
    curves = role_curves(estimates, roles)
    assert set(curves) == {"induction", "previous-token", OTHERS}  # bigram's L9H9 was never estimated
    np.testing.assert_array_equal(curves["induction"][1][1:], [[3.0, 40.0]] * 2)
    assert np.isnan(curves["induction"][1][0, 1])
    np.testing.assert_array_equal(curves["previous-token"][1], [[2.0, 10.0]] * 3)
    # member 0's heads with no role: L0H0 and L1H1 (median 2.5, or 1 where L1H1 is missing);
    # member 1's: L0H1 and L1H0 (the roles took L1H1 and L0H0), median 25
    np.testing.assert_array_equal(curves[OTHERS][1], [[1.0, 25.0], [2.5, 25.0], [2.5, 25.0]])


def test_the_previous_token_role_is_each_members_highest_scoring_layer_0_head():
    from types import SimpleNamespace

    from analysis.learning_coefficient import PREVIOUS_TOKEN, head_roles

    names = ["induction/L0H0/prev_token", "induction/L0H1/prev_token", "induction/L1H0/copying"]
    values = np.array([[[0.9, 0.1], [0.1, 0.2], [5.0, 5.0]], [[0.1, 0.3], [0.8, 0.2], [5.0, 5.0]]])
    diagnostics = SimpleNamespace(
        names=names, values=values, steps=np.array([10, 20])
    )  # (row, metric, member)
    roles = head_roles(SimpleNamespace(groups={"diagnostics": diagnostics}))
    assert roles == {PREVIOUS_TOKEN: ["L0H1", "L0H0"]}  # from the last row only


def test_critical_points_of_a_planted_llc_curve():
    """A curve with a trough at step 50 and a peak at step 400, sampled at 52 log-spaced
    snapshots with noise: both found within 0.1 log-steps, nothing else; a negative estimate
    (chains below L(w*)) is left out of the median, not averaged in."""
    from analysis.learning_coefficient import critical_points, median_curve

    steps = np.unique(np.round(np.expm1(np.linspace(0, math.log1p(1000), 52))))
    x = np.log1p(steps)
    curve = (
        20
        + 8 * np.exp(-(((x - math.log1p(400)) / 0.5) ** 2))
        - 6 * np.exp(-(((x - math.log1p(50)) / 0.5) ** 2))
    )
    noisy = curve[:, None] + np.random.default_rng(0).normal(0, 0.3, (len(steps), 4))
    noisy[10, 0] = -500.0  # one snapshot's chains fell below L(w*)
    median = median_curve({"llc": noisy})
    assert median[10] == pytest.approx(np.median(noisy[10, 1:]))
    found = critical_points("model", steps, median)
    assert [p.kind for p in found] == ["trough", "peak"], found
    for point, want in zip(found, (50, 400)):
        assert abs(math.log1p(point.step) - math.log1p(want)) < 0.1, (point, want)


def test_no_smoothed_curve_or_turn_through_fewer_points_than_the_window():
    """Three snapshots over a run (a peak in the middle one) give no smoothed curve and no
    critical point: the smoother's window (2 x 0.3 log-steps either side) never holds 3 points.
    With a dense stretch, the curve exists there and nowhere else."""
    from analysis.learning_coefficient import critical_points, smoothed

    steps, values = np.array([0, 30, 1000]), np.array([1.0, 5.0, 2.0])
    assert smoothed(steps, values)[0].size == 0 and critical_points("model", steps, values) == []
    dense = np.round(np.expm1(np.linspace(math.log1p(100), math.log1p(300), 9)))
    steps = np.concatenate([[0, 5], dense])
    grid, curve = smoothed(steps, np.ones(len(steps)))
    drawn = grid[np.isfinite(curve)]
    assert drawn.min() >= 60 and drawn.max() == pytest.approx(300)  # only about the dense stretch


def test_calibration_flags_name_what_went_wrong():
    from types import SimpleNamespace

    from devinterp.cli.llc import calibration_flags

    draws = np.arange(40.0)

    def made(trace, below=False, diverged=False, eps=1e-3):
        return SimpleNamespace(
            loss_trace=np.broadcast_to(trace, (1, 2, 40)),
            init_loss=np.array([1.0]),
            below_init=np.array([[below, False]]),
            diverged=np.array([[False, diverged]]),
            config=SamplerConfig(n_beta=10.0, eps=eps, gamma=100.0, draws=40),
        )

    levelled = 1.0 + 0.5 * (1 - np.exp(-draws / 3))  # rises and settles within the first quarter
    climbing = 1.0 + 0.05 * draws  # still rising at the end
    assert calibration_flags(made(levelled)) == []
    assert calibration_flags(made(climbing)) == ["not levelled off"]
    assert calibration_flags(made(levelled, below=True, diverged=True)) == ["below L(w*)", "diverged"]
    # 40 steps at eps 1e-3, gamma 100 outlast the localisation's 2 / (eps gamma) = 20; at 1e-4 (200) not
    assert calibration_flags(made(levelled, eps=1e-4)) == ["shorter than 2/(eps gamma) = 200 steps"]


def test_a_sidecar_from_before_step_sizes_were_kept_reads_as_made_at_its_eps(tmp_path):
    """An llc.h5 without the ``eps`` datasets (written before --eps-for) reads as made at the
    file's --eps, so a rerun at that eps goes on and one at another eps is refused."""
    import h5py

    from devinterp.cli.llc import check_step_sizes
    from devinterp.store.llc_file import read_estimates, write_estimates

    settings = {"sampler": {"eps": 1e-3, "n_beta": 10.0}, "members": [0], "seed": 0}
    entry = {
        "llc": np.array([2.0]),
        "std_error": np.array([0.1]),
        "diverged": np.array([0]),
        "eps": np.float64(1e-3),
    }
    path = tmp_path / "llc.h5"
    write_estimates(path, {(5, "model"): entry, (9, "model"): entry}, settings)
    with h5py.File(path, "a") as f:
        del f["model/eps"]
    store = read_estimates(path, settings)
    assert [float(found["eps"]) for found in store.values()] == [1e-3, 1e-3]
    check_step_sizes(path, store, {}, 1e-3)  # the same eps: goes on
    with pytest.raises(ValueError, match="model was estimated with eps 0.001 \\(step 5\\), asked 0.0001"):
        check_step_sizes(path, store, {"model": 1e-4}, 1e-3)


def test_the_llc_defaults_pass_the_relaxation_rule_calibrate_applies():
    """`devinterp llc RUN` with no options: steps per chain at least 2 / (eps gamma)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from devinterp.cli.llc import calibration_flags, parse

    args = parse(["run"])
    steps = args.burn_in + args.draws
    assert steps >= 2 / (args.eps * args.gamma), (steps, args.eps, args.gamma)
    config = SamplerConfig(10.0, eps=args.eps, gamma=args.gamma, draws=args.draws, burn_in=args.burn_in)
    trace = np.ones((1, args.chains, args.draws))
    estimate = SimpleNamespace(
        config=config,
        below_init=np.zeros((1, args.chains), bool),
        diverged=np.zeros((1, args.chains), bool),
        loss_trace=trace,
        init_loss=np.zeros(1),
    )
    assert calibration_flags(estimate) == []
    short = SimpleNamespace(**{**vars(estimate), "config": replace(config, burn_in=0)})
    assert calibration_flags(short) == ["shorter than 2/(eps gamma) = 200 steps"]


def test_wandb_never_receives_an_llc_the_report_leaves_out(tmp_path):
    """Negative estimates (chains below L(w*)) and diverged ones (NaN) are left out of the median
    sent to W&B, as the report leaves them out; W&B gets their count instead."""
    from analysis.learning_coefficient import median_curve
    from devinterp.cli.llc import send_to_wandb
    from devinterp.store.wandb_files import history, run_files

    store = {
        (0, "induction"): {"llc": np.array([1.0, -120.0, 2.0, np.nan])},
        (10, "induction"): {"llc": np.array([-5.0, -6.0, np.nan, np.nan])},
    }
    send_to_wandb(tmp_path, store, {}, "offline", {}, ["start", "induction"])
    (segment,) = run_files(tmp_path / "wandb")
    rows = {row["trainer/global_step"]: row for row in history(segment)}
    assert rows[0]["induction/llc"] == 1.5 and rows[0]["induction/llc_left_out"] == 2
    assert "induction/llc" not in rows[10] and rows[10]["induction/llc_left_out"] == 4
    report = median_curve({"llc": np.stack([store[0, "induction"]["llc"], store[10, "induction"]["llc"]])})
    assert report[0] == 1.5 and np.isnan(report[1])  # the report's curve: the same values
