"""The run-folder policy without a Trainer: which folder a fit writes, and what a resume starts from."""

from pathlib import Path

import pytest
from jsonargparse import Namespace

from devinterp.cli.run_folder import RUN_DIR_VARIABLE, plan_run_folder
from devinterp.errors import UsageError


def config(
    root: Path, name: str | None = "quick", resume: str | None = None, max_steps: int = 10
) -> Namespace:
    return Namespace(
        run=Namespace(name=name, root=str(root), resume=resume),
        trainer=Namespace(max_steps=max_steps),
        config=[],
    )


def test_a_new_run_never_reuses_a_folder(tmp_path):
    first = plan_run_folder(config(tmp_path), {})
    assert first.run_dir == tmp_path / "quick" and first.resume_step is None and not first.resumes
    (tmp_path / "quick").mkdir()
    second = plan_run_folder(config(tmp_path), {})
    assert second.run_dir == tmp_path / "quick-2" and second.name == "quick" and not second.child_rank


def test_processes_started_from_outside_share_the_name_they_were_given(tmp_path):
    (tmp_path / "quick").mkdir()
    rank_zero = plan_run_folder(config(tmp_path), {"RANK": "0"})
    rank_one = plan_run_folder(config(tmp_path), {"RANK": "1"})
    assert rank_zero.run_dir == rank_one.run_dir == tmp_path / "quick"
    assert rank_one.child_rank and not rank_zero.child_rank


def test_a_process_launched_by_rank_zero_joins_its_folder(tmp_path):
    found = plan_run_folder(config(tmp_path), {"LOCAL_RANK": "1", RUN_DIR_VARIABLE: str(tmp_path / "x")})
    assert found.child_rank and found.run_dir == tmp_path / "x" and found.name is None


def test_a_resume_without_a_checkpoint_restarts_from_step_zero_and_keeps_the_saved_config(tmp_path, capsys):
    run = tmp_path / "quick"
    run.mkdir()
    (run / "config.yaml").write_text("run: {}\n")
    found = plan_run_folder(config(tmp_path, resume=str(run)), {})
    assert found.resume_step == 0 and found.ckpt_path is None and found.resumes
    assert "no checkpoint yet; restarting the run from step 0" in capsys.readouterr().out


def test_resuming_a_folder_that_is_no_run_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="not a run folder \\(no config.yaml\\)"):
        plan_run_folder(config(tmp_path, resume=str(tmp_path)), {})
