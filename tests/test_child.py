"""A failed `devinterp fit` child's own message reaches the parent's error, on a line of its own."""

import sys

from devinterp.cli.child import last_message, run_child

BAR = "step:  40%|████      | 4/10 [00:01<00:02,  3.10it/s, loss=2.1]"


def test_the_last_message_is_the_childs_error_not_its_progress_bar():
    tail = f"{BAR}\r{BAR}devinterp: error: training diverged: train/loss is nan at step 4\n{BAR}\r"
    assert last_message(tail) == "devinterp: error: training diverged: train/loss is nan at step 4"
    tail = f"notice: ...\n{BAR}\r{BAR}\ndevinterp: error: data.knockout: no primitive named 'bigrm'\n{BAR}\r"
    assert last_message(tail) == "devinterp: error: data.knockout: no primitive named 'bigrm'"
    assert last_message(f"{BAR}\r{BAR}\r") == "no message"


def test_a_child_that_fails_returns_its_exit_code_and_last_message(capfd):
    code = (
        "import sys; sys.stderr.write('" + BAR + "\\r' * 3); "
        "sys.stderr.write('\\ndevinterp: error: training diverged at step 4\\n'); sys.exit(3)"
    )
    assert run_child([sys.executable, "-c", code]) == (3, "devinterp: error: training diverged at step 4")
    assert "3.10it/s" in capfd.readouterr().err  # passed through as it came
    assert run_child([sys.executable, "-c", "print('fine')"]) == (0, "no message")
