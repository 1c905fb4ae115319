"""The report's Table-3 arithmetic and side-by-side rows against a hand-written ledger and
evaluation results (tests/unit/eval/report_fixtures.py)."""

from __future__ import annotations

import json

import pytest

from offline_rlhf.eval.report import (
    device_hours,
    iterative_rounds,
    judge_scores,
    rounds_markdown,
    shared_hours,
    side_by_side,
    table3,
)
from tests.unit.eval.report_fixtures import JUDGE, ledger_line, write_run

PREP = {"generate": 20.0, "label": 10.0, "mix": 0.5}


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run")


def test_table3_charges_offline_methods_their_data_and_ppo_its_four_modules(run):
    rows = {row["method"]: row for row in table3(device_hours(run))}
    assert list(rows) == ["dpo", "dt", "mle_filter", "rwr", "ppo"]
    assert rows["dt"]["stages"] == {**PREP, "align_dt": 59.5}
    assert (rows["dt"]["data_preparation"], rows["dt"]["training"], rows["dt"]["total"]) == (30.5, 59.5, 90.0)
    assert rows["mle_filter"]["total"] == 52.5  # 12 + 10 over its two ledger rows, + 30.5
    assert rows["rwr"]["total"] == 89.0
    # DPO's data: generation, labeling and the reference pass (its pairs), not the mix
    assert rows["dpo"]["stages"] == {"generate": 20.0, "label": 10.0, "reference": 5.0, "align_dpo": 40.0}
    assert rows["dpo"]["total"] == 75.0
    ppo = rows["ppo"]
    assert ppo["stages"] == {"ppo_actor": 400.0, "ppo_critic": 150.0, "ppo_reference": 90.0, "ppo_reward": 90.0}
    assert (ppo["data_preparation"], ppo["training"], ppo["total"], ppo["share_of_ppo"]) == (0.0, 730.0, 730.0, 1.0)
    assert rows["dt"]["share_of_ppo"] == pytest.approx(90 / 730) and f"{rows['dt']['share_of_ppo']:.1%}" == "12.3%"
    assert rows["mle_filter"]["share_of_ppo"] == pytest.approx(52.5 / 730)


def test_sft_and_rm_are_shared_and_counted_once(run):
    hours = device_hours(run)
    assert shared_hours(hours) == {"sft": 31.5, "rm": 8.5, "total": 40.0}  # the failed SFT try counts
    assert hours["sft"]["executions"] == 2
    assert all("sft" not in row["stages"] and "rm" not in row["stages"] for row in table3(hours))


def test_without_ppo_there_is_no_share(run):
    lines = [line for line in (run / "ledger.jsonl").read_text().splitlines() if '"ppo_' not in line]
    (run / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    rows = table3(device_hours(run))
    assert [r["method"] for r in rows] == ["dpo", "dt", "mle_filter", "rwr"]
    assert all(r["share_of_ppo"] is None for r in rows)


def test_side_by_side_joins_quality_judge_and_cost(run):
    results = json.loads((run / "eval" / "results.json").read_text())
    entries = {e["model"]: e for e in side_by_side(results, JUDGE, table3(device_hours(run)))}
    assert list(entries) == ["sft", "dt", "dt_low", "ppo", "dpo", "mle_filter", "rwr"]  # evaluated first
    ppo = entries["ppo"]
    assert ppo["quality"]["gold"]["mean"] == 2.25 and ppo["quality"]["gold"]["difference"] == 0.75
    assert (ppo["device_hours"], ppo["share_of_ppo"], ppo["cut_off"]) == (730.0, 1.0, 3)
    assert ppo["judge"] == {"value": 7.02, "stderr": 0.25, "label": "mean score"}
    assert entries["sft"]["device_hours"] is None and entries["dt_low"]["device_hours"] is None
    assert entries["dt_low"]["reward_prompt"] == -1.5
    assert entries["rwr"]["quality"] == {} and entries["rwr"]["device_hours"] == 89.0


def test_pairwise_judge_results_give_win_rates_against_the_judge_baseline():
    judge = {"format": "pairwise", "baseline": "sft", "judge_model": "j", "summary": {"games": [
        {"model": "dt", "opponent": "sft", "n": 10, "win_rate": 0.7, "win_rate_low": 0.5, "win_rate_high": 0.9},
        {"model": "dt", "opponent": "ppo", "n": 10, "win_rate": 0.4, "win_rate_low": 0.2, "win_rate_high": 0.6}]}}
    assert judge_scores(judge) == {"dt": {"value": 0.7, "interval": [0.5, 0.9], "label": "win rate vs sft"}}
    assert judge_scores(None) == {}


def test_iterative_rounds_add_their_own_cost_cumulatively(run):
    """Round 2 of DT in run_dir/round_2/ (its own ledger); evaluated as dt_round_2."""
    (run / "round_2").mkdir()
    (run / "round_2" / "ledger.jsonl").write_text("".join(
        ledger_line(stage, hours) + "\n" for stage, hours in (("generate", 18.0), ("label", 9.0), ("mix", 1.0),
                                                              ("align_dt", 40.0))))
    results = json.loads((run / "eval" / "results.json").read_text())
    results["table"]["dt_round_2"] = results["table"]["dt"]
    rounds = iterative_rounds(run, table3(device_hours(run)), results)
    assert [(r["method"], r["round"], r["model"]) for r in rounds] == [("dt", 1, "dt"), ("dt", 2, "dt_round_2")]
    assert [r["device_hours"] for r in rounds] == [90.0, 68.0]
    assert [r["cumulative_device_hours"] for r in rounds] == [90.0, 158.0]
    assert rounds[1]["quality"] == results["table"]["dt"]
    table = rounds_markdown(rounds)
    assert "| dt | 2 | dt_round_2 | 68.0000 | 158.0000 |" in table
    (run.parent / "plain").mkdir()
    assert iterative_rounds(run.parent / "plain", [], None) == []  # no round folders: no section
