"""Every `devinterp` command the README shows runs, as written, at a tiny size: the commands are
read from the README's "Using it" block, and only size options are appended (fewer steps, a
smaller model, fewer SGLD draws). A README command that stops working fails here."""

import re
import shlex
import shutil

from devinterp.cli.main import main
from tests.conftest import ROOT

# appended to every training command (fit, and the runs dependence and sweep start)
TINY_FIT = [
    "--trainer.max_steps", "3", "--model.n_members", "2", "--model.d_model", "16", "--model.d_head", "8",
    "--model.n_heads", "2", "--data.seq_len", "16", "--data.batch_size", "4", "--data.probe_size", "8",
    "--run.wandb_mode", "disabled",
]  # fmt: skip
TINY_LLC = [
    "--draws",
    "2",
    "--burn-in",
    "0",
    "--chains",
    "1",
    "--refinements",
    "model",
    "--wandb",
    "disabled",
]


def readme_commands() -> list[list[str]]:
    """The README's `devinterp ...` lines in its "Using it" block, comments dropped."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Using it\s+```bash\n(.*?)```", readme, re.S).group(1)
    lines = [line.split(" #")[0].strip() for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("devinterp ")]


def sized(argv: list[str]) -> list[str]:
    command = argv[0] if argv[0] != "language" else f"language {argv[1]}"
    if command == "fit" and "--print_config" not in argv:
        return [*argv, *TINY_FIT]
    if command in ("dependence", "sweep"):
        return [*argv, *([] if "--" in argv else ["--"]), *TINY_FIT]
    if command == "llc":
        return [*argv, *TINY_LLC]
    if command == "resume":  # the tiny run above has finished: extend it by two steps
        return [*argv, "--trainer.max_steps", "5"]
    return argv


def test_the_readme_shows_the_day_to_day_commands():
    shown = {argv[0] for argv in readme_commands()}
    assert {"fit", "validate", "resume", "sweep", "language", "analyze", "dependence", "llc"} <= shown


def test_every_readme_command_runs_at_a_tiny_size(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # read only
    (tmp_path / "docs" / "texts").mkdir(parents=True)  # fit-text writes its spec beside the text
    shutil.copy(ROOT / "docs" / "texts" / "harbour.txt", tmp_path / "docs" / "texts")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for argv in readme_commands():
        try:
            code = main(sized(argv))
        except SystemExit as stop:  # --print_config prints and exits
            code = stop.code or 0
        assert code == 0, f"devinterp {shlex.join(argv)}: exit {code}\n{capsys.readouterr().err[-2000:]}"
    assert (tmp_path / "runs" / "quickstart" / "analysis" / "report.md").is_file()
    assert (tmp_path / "runs" / "quickstart" / "llc.h5").is_file()
    assert (tmp_path / "runs" / "dependence" / "knockout-bigram" / "timeline.h5").is_file()
    assert (tmp_path / "docs" / "texts" / "harbour.yaml").is_file()  # in the temp folder, not the repo
    assert not (ROOT / "docs" / "texts" / "harbour.yaml").exists()
