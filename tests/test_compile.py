"""torch.compile behind ``model.compile``: the same training, really compiled (issue: Speed and scale)."""

import torch
from torch._dynamo.utils import counters

from devinterp.data import MemberStreams, ToyLanguageData
from devinterp.module import TensorTransformerModule
from tests.conftest import SEED_SPEC_PATH


def train(compile: bool, steps: int = 3):
    data = ToyLanguageData(
        language=str(SEED_SPEC_PATH),
        seq_len=16,
        batch_size=4,
        n_members=2,
        seed=0,
        probe_size=4,
        steps_per_block=4,
    )
    module = TensorTransformerModule(
        d_vocab=data.d_vocab,
        n_ctx=16,
        label_names=data.label_names,
        n_members=2,
        n_layers=2,
        n_heads=2,
        d_model=16,
        d_head=8,
        compile=compile,
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    stream = iter(MemberStreams(data.language, 16, 4, data.stream_seeds, 4))
    losses = []
    for step in range(steps):
        loss = module.training_step(next(stream), step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return module, torch.stack(losses)


def test_compiled_training_equals_eager_and_runs_compiled_code():
    torch._dynamo.reset()
    counters.clear()
    eager, eager_losses = train(compile=False)
    assert counters["stats"]["unique_graphs"] == 0
    compiled, compiled_losses = train(compile=True)
    # it compiled one whole graph (fullgraph: a graph break would have raised) and kept using it
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert torch._dynamo.config.fail_on_recompile_limit_hit  # past the limit: an error, not eager
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
