"""Ctrl-C's line says "resume" only for stages whose rerun goes on from saved work (was:
for every stage, mix and report included, which start over)."""

import pytest

import offline_rlhf.cli as cli


def interrupted(monkeypatch, capsys, stage: str, *overrides: str) -> str:
    def ctrl_c(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "run", ctrl_c)
    assert cli.main([stage, "run_dir=/nowhere", *overrides]) == 130
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("stage", ["eval", "generate", "label", "sft"])
def test_a_resumable_stage_says_rerun_to_resume(monkeypatch, capsys, stage):
    assert interrupted(monkeypatch, capsys, stage) == \
        f"orlhf {stage}: interrupted (Ctrl-C); rerun the same command to resume"


@pytest.mark.parametrize("stage", ["mix", "report"])
def test_a_stage_that_starts_over_says_so(monkeypatch, capsys, stage):
    assert interrupted(monkeypatch, capsys, stage) == \
        f"orlhf {stage}: interrupted (Ctrl-C); nothing was kept: rerun the same command to start it over"


@pytest.mark.parametrize("setting", ["eval_only=true", "eval_only=True", "+eval_only=yes"])
def test_a_reward_model_that_only_scores_starts_over(monkeypatch, capsys, setting):
    line = interrupted(monkeypatch, capsys, "rm", setting, "init.checkpoint=x")
    assert line.endswith("nothing was kept: rerun the same command to start it over")
    assert interrupted(monkeypatch, capsys, "rm", "eval_only=false").endswith("rerun the same command to resume")


def test_every_resumable_stage_is_a_stage():
    assert cli.RESUMABLE <= set(cli.STAGES)


def test_under_torchrun_only_rank_0_says_it_and_no_rank_waits(monkeypatch, capsys):
    """A terminal's Ctrl-C reaches every rank: each said it, rank 1 after a 5 s wait."""
    monkeypatch.setattr(cli, "_exit_without_teardown", lambda code: None)  # torchrun's workers exit without teardown
    monkeypatch.setattr(cli.time, "sleep", lambda seconds: pytest.fail(f"waited {seconds} s"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert interrupted(monkeypatch, capsys, "generate") == ""
    monkeypatch.setenv("RANK", "0")
    assert interrupted(monkeypatch, capsys, "generate").endswith("rerun the same command to resume")
