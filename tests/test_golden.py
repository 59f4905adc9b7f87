"""The timeline a fixed tiny run writes equals the stored golden one, row for row (tests/golden.py)."""

import numpy as np
import pytest

from tests.golden import LANGUAGES, contents, golden_path, golden_run


@pytest.mark.parametrize("name", list(LANGUAGES))
def test_a_new_run_writes_the_golden_timeline(tmp_path, name):
    want = dict(np.load(golden_path(name)))
    got = contents(golden_run(tmp_path, name))
    assert sorted(got) == sorted(want)
    for key in want:
        if want[key].dtype.kind in "US":
            assert got[key].tolist() == want[key].tolist(), key
        else:  # same build, one thread: the same bits
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
