"""A rerun of a finished stage that fails or stops before it changed an output (a missing
input, Ctrl-C during start-up, a refused resume) leaves the stage complete under its old
config (`runtime._claimed`): before, any such error removed DONE and kept the failed run's
config.yaml, so a pipeline ran that stage, and every stage after it, again. A rerun that
wrote something first does not get DONE back."""

import pytest

from offline_rlhf.config.evaluation import ReportConfig
from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.host import CONFIG_FILE, DONE, stage_outputs
from offline_rlhf.runtime import stage_runtime


def finished_stage(run_dir):
    """`report` run once to completion: its output, DONE and config.yaml in place."""
    with stage_runtime("report", str(run_dir), ParallelConfig(), None, ReportConfig(run_dir=str(run_dir))) as (rt, _):
        (rt.stage_dir / "out.txt").write_text("made")
        (rt.stage_dir / DONE).write_text("done")
    return run_dir / "report"


def rerun(run_dir, failure: BaseException, write_first: bool = False) -> None:
    config = ReportConfig(run_dir=str(run_dir) + "/")  # another config.yaml than the finished run's
    with pytest.raises(type(failure)):
        with stage_runtime("report", str(run_dir), ParallelConfig(), None, config) as (rt, _):
            assert not (rt.stage_dir / DONE).exists()  # a kill from here on leaves no DONE beside the new config
            if write_first:
                (rt.stage_dir / "out.txt").write_text("half")
            raise failure


@pytest.mark.parametrize("failure", [FileNotFoundError("no input"), KeyboardInterrupt(), SystemExit(75)])
def test_a_rerun_that_changed_nothing_leaves_the_stage_complete_under_its_old_config(tmp_path, failure):
    stage_dir = finished_stage(tmp_path)
    before = {name: (stage_dir / name).read_text() for name in (DONE, CONFIG_FILE)}
    rerun(tmp_path, failure)
    assert {name: (stage_dir / name).read_text() for name in (DONE, CONFIG_FILE)} == before


def test_a_rerun_that_wrote_an_output_before_failing_is_not_complete(tmp_path):
    stage_dir = finished_stage(tmp_path)
    rerun(tmp_path, ValueError("crashed"), write_first=True)
    assert not (stage_dir / DONE).exists() and (stage_dir / "out.txt").read_text() == "half"


def test_the_outputs_compared_leave_out_what_a_rerun_writes_before_its_stage_starts(tmp_path):
    for name in (DONE, CONFIG_FILE, "launch.log", ".lock", "out.txt", "checkpoints/step_1/model.pt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    assert set(stage_outputs(tmp_path)) == {"out.txt", "checkpoints/step_1/model.pt"}
