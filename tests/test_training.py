import numpy as np
import pytest
import torch

from devinterp.data import ToyLanguageData
from devinterp.model import ModelConfig, TensorTransformer
from devinterp.module import TensorTransformerModule
from devinterp.probe import evaluate_probe, grouped_mean
from tests.conftest import SEED_SPEC_PATH
from tests.helpers.tiny import tiny_parts, tiny_trainer

SEQ_LEN = 24


def small_run(
    n_members: int,
    seed: int,
    steps: int = 20,
    share_data: bool = False,
    clip: float | None = None,
    **module_args,
):
    data, module = tiny_parts(
        seq_len=SEQ_LEN,
        n_members=n_members,
        seed=seed,
        batch_size=8,
        probe_size=16,
        data={"share_data": share_data},
        **{"warmup_steps": 5, **module_args},
    )
    trainer = tiny_trainer(steps, gradient_clip_val=clip)
    trainer.fit(module, datamodule=data)
    return module


@pytest.mark.parametrize("clip", [None, 0.05])  # 0.05 binds: the gradient norms are above it
def test_member_k_of_an_ensemble_matches_a_solo_run_with_its_seeds(clip):
    ensemble = small_run(n_members=3, seed=40, clip=clip).model
    initial = TensorTransformer(ensemble.cfg, seed=40)
    for k in range(3):
        solo = small_run(n_members=1, seed=40 + k, clip=clip).model
        for name, param in ensemble.named_parameters():
            moved = (param[k] - getattr(initial, name)[k]).abs().max()
            assert moved > 1e-3, f"{name} of member {k} did not train"
            # stated tolerance: float32 batched vs unbatched matmul, over 20 AdamW steps
            torch.testing.assert_close(
                param[k], getattr(solo, name)[0], rtol=1e-4, atol=2e-5, msg=f"{name} of member {k}"
            )


def test_gradient_clipping_is_torchs_per_member():
    """Each member's gradient is clipped as torch's clip_grad_norm_ clips that member alone."""
    module = TensorTransformerModule(
        d_vocab=12, n_ctx=SEQ_LEN, label_names=["all"], n_members=3, seed=0, d_model=8, d_head=4, n_heads=2
    )
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([10.0, 1e-3, 1.0])  # member 1's norm is below the limit: left alone
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * scales.view(-1, *[1] * (p.dim() - 1))
    expected = []
    for k in range(3):
        member = [torch.zeros(p.shape[1:], requires_grad=True) for p in module.parameters()]
        for alone, p in zip(member, module.parameters()):
            alone.grad = p.grad[k].clone()
        norm = torch.nn.utils.clip_grad_norm_(member, max_norm=1.0)
        expected.append(([alone.grad for alone in member], float(norm)))
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert expected[0][1] > 1.0 > expected[1][1]
    for k, (member, _) in enumerate(expected):
        for p, want in zip(module.parameters(), member):
            torch.testing.assert_close(p.grad[k], want)
    clipped = torch.stack([p.grad.flatten(1).pow(2).sum(1) for p in module.parameters()]).sum(0).sqrt()
    assert clipped[0] == pytest.approx(1.0, rel=1e-4) and clipped[1] == pytest.approx(expected[1][1])


def test_members_differ_and_shared_data_only_differs_by_initialisation():
    data = ToyLanguageData(
        language=str(SEED_SPEC_PATH), seq_len=SEQ_LEN, batch_size=4, n_members=3, seed=5, steps_per_block=2
    )
    batch = next(iter(data.train_dataloader()))
    assert batch["tokens"].shape == (3, 4, SEQ_LEN)
    assert not torch.equal(batch["tokens"][0], batch["tokens"][1])
    data.share_data = True
    shared = next(iter(data.train_dataloader()))
    assert torch.equal(shared["tokens"][0], shared["tokens"][2])


def test_stream_is_a_function_of_the_step():
    data = ToyLanguageData(
        language=str(SEED_SPEC_PATH), seq_len=SEQ_LEN, batch_size=4, n_members=2, seed=1, steps_per_block=3
    )
    from devinterp.data import MemberStreams

    stream = iter(data.train_dataloader().dataset)
    batches = [next(stream) for _ in range(7)]
    resumed = iter(MemberStreams(data.language, SEQ_LEN, 4, data.stream_seeds, 3, start_step=5))
    assert torch.equal(next(resumed)["tokens"], batches[5]["tokens"])
    assert torch.equal(next(resumed)["labels"], batches[6]["labels"])


def test_grouped_mean_matches_a_loop():
    values = torch.randn(3, 50)
    groups = torch.randint(-1, 4, (3, 50))
    got = grouped_mean(values, groups, 5)
    for m in range(3):
        for g in range(5):
            chosen = values[m][groups[m] == g]
            if chosen.numel():
                assert got[m, g].item() == pytest.approx(chosen.mean().item(), rel=1e-5)
            else:
                assert torch.isnan(got[m, g])


def test_probe_excess_is_cross_entropy_minus_exact_entropy():
    data = ToyLanguageData(language=str(SEED_SPEC_PATH), seq_len=SEQ_LEN, n_members=2, probe_size=24)
    model = TensorTransformer(
        ModelConfig(d_vocab=data.d_vocab, n_ctx=SEQ_LEN, n_members=2, d_model=16, d_head=8), seed=0
    )
    with torch.no_grad():
        model.W_U.normal_(0, 0.3)
        model.W_O.normal_(0, 0.3)
    probe = data.probe
    result = evaluate_probe(model, probe, len(data.label_names), len(data.language.rule_names), batch_size=10)
    # independent: expected cross-entropy under the exact distribution, minus its entropy
    true_next = data.language.true_next_dist(probe.tokens.numpy())[:, :-1]  # float64
    log_q = (
        torch.log_softmax(model(probe.tokens[None, :, :-1].expand(2, -1, -1)).double(), -1).detach().numpy()
    )
    cross_entropy = -(true_next[None] * log_q).sum(-1)
    entropy = -(true_next * np.log(np.where(true_next > 0, true_next, 1))).sum(-1)
    excess = cross_entropy - entropy[None]  # (M, n, T-1)
    labels = probe.labels[:, 1:].numpy()
    for i, name in enumerate(data.label_names[1:], start=1):
        expected = excess[:, labels == i].mean(-1)
        np.testing.assert_allclose(result.excess_by_label[:, i].numpy(), expected, rtol=1e-4)
    # at zero unembedding the prediction is uniform: excess = log V - H
    zero = TensorTransformer(model.cfg, seed=0)
    at_init = evaluate_probe(zero, probe, len(data.label_names), len(data.language.rule_names))
    np.testing.assert_allclose(at_init.excess.numpy(), np.log(data.d_vocab) - entropy.mean(), rtol=1e-5)


def test_training_lowers_the_per_primitive_loss():
    module = small_run(n_members=2, seed=0, steps=60)
    data = ToyLanguageData(language=str(SEED_SPEC_PATH), seq_len=SEQ_LEN, n_members=2, probe_size=64)
    trained = evaluate_probe(module.model, data.probe, len(data.label_names), len(data.language.rule_names))
    initial = evaluate_probe(
        TensorTransformer(module.model.cfg, seed=0),
        data.probe,
        len(data.label_names),
        len(data.language.rule_names),
    )
    bigram = data.label_names.index("bigram")
    assert (trained.excess_by_label[:, bigram] < 0.6 * initial.excess_by_label[:, bigram]).all()


@pytest.mark.parametrize("schedule,final_factor", [("constant", 1.0), ("cosine", 0.1)])
def test_learning_rate_warms_up_then_follows_the_schedule(schedule, final_factor):
    module = small_run(n_members=1, seed=0, steps=20, schedule=schedule, lr=0.01, warmup_steps=5)
    scheduler = module.trainer.lr_scheduler_configs[0].scheduler
    factors = [scheduler.lr_lambdas[0](step) for step in range(21)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == pytest.approx(
        1.0
    )  # linear warm-up over 5 steps
    assert factors[20] == pytest.approx(final_factor)
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * final_factor)


def test_knock_in_curriculum_switches_language_at_the_set_step():
    data = ToyLanguageData(
        language=str(SEED_SPEC_PATH),
        seq_len=SEQ_LEN,
        batch_size=16,
        n_members=2,
        seed=3,
        steps_per_block=4,
        knockin=["bigram"],
        knockin_steps=6,
    )
    stream = iter(data.train_dataloader().dataset)
    full = data.language.label_names
    for step in range(12):
        labels = next(stream)["labels"]
        if step < 6:  # bigram alone: no induction or skip-trigram positions can occur
            assert not torch.isin(
                labels, torch.tensor([full.index("induction"), full.index("skip_trigram")])
            ).any()
        else:
            assert (labels == full.index("induction")).any()
    assert data.probe.labels.eq(full.index("induction")).any()  # probes use the full language
