"""DataLoader workers: step s's batch is bit-identical for any number of workers, from any start
step, under a knock-in curriculum and a DDP slice; a run trained through workers equals one
without."""

import pytest
import torch

from devinterp.data import MemberStreams, ToyLanguageData, stream_loader
from devinterp.errors import UsageError
from devinterp.language import load_language
from tests.conftest import SEED_SPEC_PATH

LANGUAGE = load_language(SEED_SPEC_PATH)


def streams(start_step=0, **options) -> MemberStreams:
    return MemberStreams(LANGUAGE, 16, 6, [3, 4], steps_per_block=4, start_step=start_step, **options)


def first_steps(iterable, n):
    out = []
    for batch in iterable:
        out.append(batch)
        if len(out) == n:
            return out


def through_workers(stream: MemberStreams, workers: int, n: int):
    return first_steps(stream_loader(stream, workers), n)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize(
    "start_step, options",
    [
        (0, {}),
        (5, {}),  # a resume inside a block
        (8, {}),  # a resume at a block boundary
        (3, {"first_language": LANGUAGE.only(["bigram"]), "first_steps": 6}),  # the switch inside block 1
        (2, {"shard": (1, 2)}),  # DDP: the second of two processes' slice
    ],
)
def test_every_step_is_the_same_for_any_number_of_workers(workers, start_step, options):
    expected = first_steps(streams(start_step, **options), 14)
    got = through_workers(streams(start_step, **options), workers, 14)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"]), step


def test_a_run_trained_through_workers_equals_one_without(tiny_run):
    def run(workers):
        _, module, _ = tiny_run(10, steps_per_block=3, data={"num_workers": workers}, n_layers=1)
        return module.model.state_dict()

    without, with_workers = run(0), run(2)
    for name, value in without.items():
        assert torch.equal(value, with_workers[name]), name


def test_auto_means_no_workers_on_a_cpu_and_bad_counts_are_refused():
    data = ToyLanguageData(language=str(SEED_SPEC_PATH), seq_len=16, batch_size=4, probe_size=8)
    assert data.num_workers == "auto" and data.workers() == 0
    for bad in (-1, "many", 1.5):
        with pytest.raises(UsageError, match="data.num_workers"):
            ToyLanguageData(language=str(SEED_SPEC_PATH), seq_len=16, num_workers=bad)


def test_auto_threads_share_the_cores_this_process_may_use(monkeypatch):
    import os

    from devinterp import threads
    from devinterp.cli.fit import compute_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert compute_threads("auto", {"accelerator": "cpu", "devices": "auto"}) == 6
    assert compute_threads("auto", {"accelerator": "cpu", "devices": 2}) == 3  # two processes here
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's four processes on this node
    assert compute_threads("auto", {"accelerator": "gpu", "devices": 4}) == 1
    assert compute_threads(3, {}) == 3
    with pytest.raises(UsageError, match="run.threads: must be at least 1"):
        compute_threads(0, {})
