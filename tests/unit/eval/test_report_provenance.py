"""The report sets quality against cost only for what was really evaluated and trained: a
model whose checkpoint changed since `orlhf eval` loses its quality columns (was: a rerun
of align_dt with another lr showed the old model's gold next to the new run's cost), and a
method's device-hours go only to a model trained in its own stage folder (was: a model
named `ppo` evaluated from the SFT folder showed SFT's quality at PPO's cost)."""

from __future__ import annotations

from pathlib import Path

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.eval.report import (
    _rm_note,
    report_markdown,
    side_by_side,
    side_by_side_markdown,
    stale_evaluations,
    table3_markdown,
)
from offline_rlhf.stage_support import checkpoint_digest
from tests.fixtures import reference_model
from tests.synthetic_preferences import MODEL

COSTS = [{"method": "dt", "total": 2.0, "share_of_ppo": 0.2}, {"method": "ppo", "total": 10.0, "share_of_ppo": 1.0}]
QUALITY = {"gold": {"mean": 1.0, "stderr": 0.1, "n": 4, "difference": 0.0, "difference_stderr": 0.0, "win_rate": 0.5,
                    "win_rate_low": 0.5, "win_rate_high": 0.5}}


def save_step(root: Path, step: int, lr: float) -> Path:
    meta = CheckpointMeta(MODEL, "lm", TrainState(step=step), metadata={"config": {"optim.lr": lr}})
    return save_checkpoint(root, reference_model(MODEL, "lm"), meta)


def evaluated(models: dict[str, tuple[Path, Path]]) -> dict:
    """results.json as `orlhf eval` writes it for models {name: (configured path, evaluated step)}."""
    return {"baseline": "sft", "prompts": 4, "max_new_tokens": 8,
            "models": {name: {"checkpoint": str(step), "configured": str(configured),
                              "checkpoint_sha256": checkpoint_digest(step), "cut_off": 0, "reward_prompt": None}
                       for name, (configured, step) in models.items()},
            "table": {name: QUALITY for name in models}}


def test_a_checkpoint_trained_on_or_rewritten_since_the_evaluation_makes_its_quality_stale(tmp_path):
    sft, dt = tmp_path / "sft" / "checkpoints", tmp_path / "align_dt" / "checkpoints"
    results = evaluated({"sft": (sft, save_step(sft, 4, 1e-3)), "dt": (dt, save_step(dt, 6, 1e-3))})
    assert stale_evaluations(results) == {}

    save_step(dt, 6, 5e-4)  # a rerun under another lr wrote the same step folder
    assert stale_evaluations(results) == {"dt": f"{dt / 'step_00000006'} was rewritten since (a rerun trained "
                                                "another model into it)"}
    save_step(sft, 8, 1e-3)  # trained on: `latest` names a newer step
    assert stale_evaluations(results)["sft"] == f"{sft} now resolves to step_00000008, not the evaluated step_00000004"

    entries = {e["model"]: e for e in side_by_side(results, None, COSTS, tmp_path)}
    assert entries["dt"]["quality"] == {} and entries["dt"]["device_hours"] == 2.0
    markdown = side_by_side_markdown(list(entries.values()), results, None)
    assert "| dt (" not in markdown and "| dt | — | — | — |" in markdown
    assert "dt: quality not shown: " in markdown and "rerun `orlhf eval` to evaluate it as it is now." in markdown


def test_a_methods_cost_goes_only_to_a_model_its_stage_trained(tmp_path):
    sft, ppo = tmp_path / "sft" / "checkpoints", tmp_path / "ppo" / "checkpoints"
    sft_step = save_step(sft, 4, 1e-3)
    results = evaluated({"sft": (sft, sft_step), "ppo": (sft, sft_step)})  # SFT's weights, named ppo
    entries = {e["model"]: e for e in side_by_side(results, None, COSTS, tmp_path)}
    assert entries["ppo"]["device_hours"] is None and entries["ppo"]["quality"] == QUALITY
    assert entries["ppo"]["cost_elsewhere"] == (f"the evaluated checkpoint {sft_step} is not from "
                                                f"{tmp_path.resolve() / 'ppo'}, which the cost of ppo is for")
    assert "ppo: device-hours not shown: the evaluated checkpoint" in side_by_side_markdown(
        list(entries.values()), results, None)

    trained = evaluated({"sft": (sft, sft_step), "ppo": (ppo, save_step(ppo, 40, 1e-3))})
    entries = {e["model"]: e for e in side_by_side(trained, None, COSTS, tmp_path)}
    assert entries["ppo"]["device_hours"] == 10.0 and entries["ppo"]["cost_elsewhere"] is None
    assert entries["dt"]["device_hours"] == 2.0  # a method nobody evaluated keeps its cost row


def test_a_run_folder_moved_whole_keeps_its_costs_beside_its_evaluation(tmp_path):
    """eval records absolute paths: after `mv run moved` every method lost its device-hours
    (its checkpoint was "not from" the moved stage folder), and a checkpoint trained on
    since was not found to be stale."""
    old = tmp_path / "run"
    sft, ppo = old / "sft" / "checkpoints", old / "ppo" / "checkpoints"
    results = {**evaluated({"sft": (sft, save_step(sft, 4, 1e-3)), "ppo": (ppo, save_step(ppo, 40, 1e-3))}),
               "run_dir": str(old), "rm": str(old / "rm" / "checkpoints")}
    moved = tmp_path / "moved"
    old.rename(moved)
    entries = {e["model"]: e for e in side_by_side(results, None, COSTS, moved)}
    assert entries["ppo"]["device_hours"] == 10.0 and entries["ppo"]["cost_elsewhere"] is None
    save_step(moved / "ppo" / "checkpoints", 50, 1e-3)
    entries = {e["model"]: e for e in side_by_side(results, None, COSTS, moved)}
    assert entries["ppo"]["stale"] == f"{moved / 'ppo' / 'checkpoints'} now resolves to step_00000050, not the " \
                                      "evaluated step_00000040"
    assert "rm: this run's own reward model" in report_markdown(moved, results, None, ("none", ""), [], [], {}, {}, [])


def test_the_rm_column_says_when_it_is_the_runs_own_reward_model(tmp_path):
    own = _rm_note(tmp_path, str(tmp_path / "rm" / "checkpoints"))
    assert own.startswith("rm: this run's own reward model, which labeled the offline methods' data and rewarded "
                          "PPO: it grades what they were trained to raise, not their quality")
    other = _rm_note(tmp_path, "/models/other_rm")
    assert other.startswith("rm: the reward model /models/other_rm. Its scores are raw")


def test_cpu_device_hours_say_that_their_shares_move_with_the_load():
    hours = {"align_dt": {"device_type": "cpu"}}
    assert "On CPU a device is one process" in table3_markdown([], hours, {"total": 0.0})
    assert "On CPU" not in table3_markdown([], {"align_dt": {"device_type": "NVIDIA H100"}}, {"total": 0.0})
