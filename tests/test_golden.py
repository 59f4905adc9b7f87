"""The timeline a fixed tiny run writes equals the stored golden one, row for row (tests/helpers/golden.py).

Steps, names and metric attributes must be identical. Values are compared to float32 rounding
across CPUs rather than bit for bit: the same torch build gives other bits on another CPU
(AVX-512 or AVX2 kernels sum in another order), by up to 1e-3 relative after 14 steps; a rank
among tokens (``out_rank``) may move by one where two logits are that close.
"""

import numpy as np
import pytest

from tests.helpers.golden import LANGUAGES, contents, golden_path, golden_run

RTOL, ATOL = 5e-3, 1e-4


def assert_close_rows(key: str, got: np.ndarray, want: np.ndarray, names: list[str] | None) -> None:
    assert got.shape == want.shape, key
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=key)
    if names is None or got.ndim != 3:
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=key)
        return
    rank = np.array(["rank" in n for n in names])
    np.testing.assert_allclose(got[:, ~rank], want[:, ~rank], rtol=RTOL, atol=ATOL, err_msg=key)
    assert np.nanmax(np.abs(got[:, rank] - want[:, rank]), initial=0) <= 1, key


@pytest.mark.parametrize("name", list(LANGUAGES))
def test_a_new_run_writes_the_golden_timeline(tmp_path, name):
    want = dict(np.load(golden_path(name)))
    got = contents(golden_run(tmp_path, name))
    assert sorted(got) == sorted(want)
    for key in want:
        if want[key].dtype.kind in "USb" or key.endswith("step") or key.endswith("committed"):
            assert got[key].tolist() == want[key].tolist(), key
        else:
            group = key.split("/")[0]
            names = want.get(f"{group}/names")
            assert_close_rows(key, got[key], want[key], None if names is None else names.tolist())
