"""The device sampler (``data.sampler: device``): the stream is a pure function of (stream seed,
step) as numpy's is, from any start step, under a knock-in curriculum and a DDP slice; a run
records its stream kind and resumes only on it. Here the device is the CPU (torch's generator
there); that its tokens follow the language exactly is checked in test_language.py."""

import copy

import h5py
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from devinterp.cli.main import main
from devinterp.data import MemberStreams, ToyLanguageData
from devinterp.errors import UsageError
from devinterp.language import load_language, parse_language
from tests.conftest import ROOT, SEED_SPEC_PATH
from tests.test_data_workers import first_steps
from tests.test_language import SPECS

LANGUAGE = load_language(SEED_SPEC_PATH)
CPU = torch.device("cpu")
TINY = ROOT / "tests" / "data" / "tiny.yaml"


def streams(start_step=0, device=CPU, **options) -> MemberStreams:
    return MemberStreams(
        LANGUAGE, 16, 6, [3, 4, 3], steps_per_block=4, start_step=start_step, device=device, **options
    )


@pytest.mark.parametrize(
    "start_step, options",
    [
        (5, {}),  # a resume inside a block
        (8, {}),  # a resume at a block boundary
        (3, {"first_language": LANGUAGE.only(["bigram"]), "first_steps": 6}),  # the switch inside block 1
        (2, {"shard": (1, 2)}),  # DDP: the second of two processes' slice
    ],
)
def test_every_step_is_a_function_of_the_seed_and_the_step(start_step, options):
    from_zero = first_steps(streams(0, **options), start_step + 10)[start_step:]
    resumed = first_steps(streams(start_step, **options), 10)
    for step, (a, b) in enumerate(zip(from_zero, resumed), start=start_step):
        assert a["tokens"].device == CPU and a["tokens"].dtype == torch.int64
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"]), step


def test_members_read_their_own_streams_and_a_shared_seed_the_same_one():
    batch = first_steps(streams(0), 1)[0]
    assert batch["tokens"].shape == (3, 6, 16)
    assert torch.equal(batch["tokens"][0], batch["tokens"][2])  # seeds 3 and 3
    assert not torch.equal(batch["tokens"][0], batch["tokens"][1])
    numpy = first_steps(streams(0, device=None), 1)[0]  # another generator: another stream
    assert not torch.equal(batch["tokens"], numpy["tokens"])
    curriculum = first_steps(streams(0, first_language=LANGUAGE.only(["bigram"]), first_steps=2), 1)[0]
    used = set(curriculum["labels"].unique().tolist())  # the full language's label ids
    assert used <= {0, LANGUAGE.label_names.index("bigram"), len(LANGUAGE.label_names) - 1}


class DataDependentOps(TorchDispatchMode):
    """Records every op that would make a GPU wait for the host or the host for the GPU: one
    whose output shape depends on the data (nonzero, masked_select, a boolean-mask index) or
    that reads a value to the host (item, bool(), int())."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
        bool_index = "index" in name and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in flat[1:]
        )
        if bool_index or any(k in name for k in ("nonzero", "masked_select", "local_scalar", "unique")):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", SPECS)
def test_the_device_walk_never_synchronises_with_the_host(name):
    """Every shape in the walk is fixed by (sequences, positions): a GPU runs a block without
    waiting on the host (and the walk could be captured as one CUDA graph)."""
    language = parse_language(copy.deepcopy(SPECS[name]))
    with DataDependentOps() as ops:
        language.sample_streams(20, 24, [[1, 2], [3, 2]], device="cpu")
    assert ops.found == []
    with DataDependentOps() as ops:  # the check sees them: the numpy walk's subsets are one
        torch.arange(6)[torch.arange(6) > 2] = 0
    assert ops.found


def test_bad_sampler_settings_are_refused_in_one_line(tmp_path):
    for options, message in (
        ({"sampler": "gpu"}, "data.sampler: one of numpy, device, got 'gpu'"),
        (
            {"sampler": "device", "num_workers": 2},
            "data.num_workers: the device sampler samples in the training",
        ),
    ):
        with pytest.raises(UsageError, match=message):
            ToyLanguageData(language=str(SEED_SPEC_PATH), seq_len=16, **options)
    data = ToyLanguageData(language=str(SEED_SPEC_PATH), seq_len=16, sampler="device")
    assert data.workers() == 0 and data.stream_kind == "torch-cpu"


def test_a_run_records_its_stream_and_resumes_only_on_it(tmp_path, capsys):
    root = tmp_path / "runs"
    fit = ["fit", "--config", str(TINY), "--run.root", str(root), "--run.wandb_mode", "disabled"]
    fit += ["--data.sampler", "device", "--run.checkpoint_every_n_steps", "2", "--trainer.max_steps", "4"]
    assert main(fit) == 0
    run = root / "tiny"
    with h5py.File(run / "timeline.h5", "r") as f:
        assert f["meta/stream_kind"][()].decode() == "torch-cpu"
        assert f["every_step/step"][-1] == 4
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main(["resume", str(run), "--trainer.max_steps", "6", "--data.sampler", "numpy"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("devinterp: error:")]
    assert len(err) == 1 and "trained on the torch-cpu stream" in err[0] and "numpy stream" in err[0], err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    assert main(["resume", str(run), "--trainer.max_steps", "6"]) == 0
    with h5py.File(run / "timeline.h5", "r") as f:
        assert f["every_step/step"][-1] == 6
