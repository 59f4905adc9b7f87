"""The probe's metric catalogue is a pure function of the language, the probe set and the model's
shape: built here without a Trainer and checked against sums recomputed from the probe tensors."""

import math

import numpy as np
import pytest

from devinterp.data import ToyLanguageData
from devinterp.probe_catalogue import probe_catalogue
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def brackets():
    data = ToyLanguageData(language=str(ROOT / "configs/languages/brackets.yaml"), seq_len=32, n_members=1)
    return data.language, data.probe


def test_the_catalogue_is_built_without_a_trainer_and_names_each_metric_once(brackets):
    language, probe = brackets
    found = probe_catalogue(language, probe, 32, n_layers=2, n_heads=3)
    names = [i.name for i in found.infos]
    assert len(names) == len(set(names))
    assert [p.name for p in found.spans] == ["brackets"]
    attention = [n for n in names if n.startswith("probe_attn/")]
    assert attention == [f"probe_attn/brackets/L{layer}H{head}" for layer in range(2) for head in range(3)]
    assert found.span_opens.shape[:2] == (1, probe.tokens.shape[0])
    assert sum(n.startswith("probe_loss/pos") for n in names) == 31


def test_each_primitives_uniform_yardstick_is_log_v_minus_its_entropy(brackets):
    """The uniform prediction's excess on a primitive's positions is log V + mean sum_v p log p
    over them: recomputed here from the probe's labels and exact distributions."""
    language, probe = brackets
    found = probe_catalogue(language, probe, 32, n_layers=1, n_heads=1)
    labels = probe.labels[:, 1:].numpy()
    true_next = probe.true_next.double().numpy()  # (n, T - 1, V)
    plogp = np.where(true_next > 0, true_next * np.log(np.where(true_next > 0, true_next, 1)), 0).sum(-1)
    for info in found.infos:
        if info.name.startswith("probe_excess/") and info.name.count("/") == 1:
            where = labels == language.label_names.index(info.primitive)
            assert info.mass == where.sum() > 0
            assert info.nothing == pytest.approx(math.log(language.d_vocab) + plogp[where].mean(), rel=1e-5)
            assert info.blind <= info.nothing + 1e-6  # the blind baseline is no worse than uniform
