"""The reference side of bench/llc_speed.py: timaeus devinterp 2.0.1's ``llc`` on our members.

Runs under the interpreter of ``.venv-devinterp`` (``make bench-llc-env``), never ours: that
library imports as ``devinterp``, which is our package's name too. Our model file is loaded from
its path under another module name, so the estimate is of the very same function: one member
wrapped as a plain ``nn.Module`` (input ids (batch, pos) -> logits (batch, pos, vocab)), the
library's own next-token cross-entropy, its SGLD with the same eps, n_beta, gamma, chains,
draws and batch size, over the same pool of sequences. Members run one after another, as a user
of the library runs them.

    .venv-devinterp/bin/python bench/llc_reference_side.py IN.npz OUT.json
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def our_model_module():
    """devinterp/model.py of this repo, loaded beside the library that owns the name ``devinterp``."""
    import devinterp  # noqa: F401  (the library's package; ours is never on the path here)

    errors = _load("toylang_errors", ROOT / "devinterp" / "errors.py")
    sys.modules["devinterp.errors"] = errors  # what our model file imports its checks from
    try:
        return _load("toylang_model", ROOT / "devinterp" / "model.py")
    finally:
        del sys.modules["devinterp.errors"]


class OneMember(nn.Module):
    """A one-member TensorTransformer as a plain language model: (batch, pos) -> (batch, pos, vocab)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids[None])[0]


def main() -> int:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    data = np.load(source)
    settings = json.loads(str(data["settings"]))
    from datasets import Dataset
    from devinterp.slt.llc import llc

    model_module = our_model_module()
    config = model_module.ModelConfig(**{**settings["model"], "n_members": 1})
    dataset = Dataset.from_dict({"input_ids": data["pool"].tolist()}).with_format("torch")
    names = [k[len("weight_") :] for k in data.files if k.startswith("weight_")]
    torch.set_num_threads(int(settings["threads"]))
    results = []
    started = time.perf_counter()
    for member in range(int(settings["members"])):
        model = model_module.TensorTransformer(config)
        with torch.no_grad():
            for name in names:
                getattr(model, name).copy_(torch.from_numpy(data[f"weight_{name}"][member : member + 1]))
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = llc(
                OneMember(model),
                dataset,
                {},
                lr=settings["eps"],
                n_beta=settings["n_beta"],
                localization=settings["gamma"],
                num_chains=settings["chains"],
                num_draws=settings["draws"],
                batch_size=settings["batch_size"],
                init_seed=settings["seed"] + member,
                device="cpu",
                output_path=str(Path(folder) / "samples.zarr"),
            )
            per_chain = np.asarray(found["llc_per_chain"].values, dtype=float)
        results.append(
            {
                "llc": float(per_chain.mean()),
                "std_error": float(per_chain.std(ddof=1) / np.sqrt(len(per_chain))),
                "init_loss": float(found["init_loss"].values),
                "per_chain": per_chain.tolist(),
            }
        )
    seconds = time.perf_counter() - started
    target.write_text(json.dumps({"seconds": seconds, "members": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
