"""The report's Table-3 arithmetic and side-by-side rows against a hand-written ledger and
evaluation results (tests/unit/eval/report_fixtures.py)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.eval.report import (
    device_hours,
    iterative_rounds,
    judge_freshness,
    judge_scores,
    rounds_markdown,
    shared_hours,
    side_by_side,
    side_by_side_markdown,
    stages_markdown,
    table3,
    table3_markdown,
)
from offline_rlhf.ledger import HEARTBEAT_DIR
from tests.unit.eval.report_fixtures import JUDGE, append_ledger, eval_answers, ledger_line, write_judge, write_run

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
    assert shared_hours(hours) == {"sft": 30.0, "rm": 8.5, "total": 38.5}
    assert all("sft" not in row["stages"] and "rm" not in row["stages"] for row in table3(hours))


def test_only_completed_and_resumed_executions_are_charged(run):
    """The failed SFT try and the failed eval (bad inputs) are not charged; MLE-filter's killed
    execution is, since the next one resumed it; RWR's killed rerun, not completed since, is not."""
    hours = device_hours(run)
    assert hours["sft"] == {"device_hours": 30.0, "wall_seconds": 30.0 / 8 * 3600, "executions": 1,
                            "device_type": "NVIDIA A100", "not_charged_device_hours": 1.5, "failed": 1,
                            "interrupted": 0, "superseded": 0}
    assert (hours["eval"]["device_hours"], hours["eval"]["executions"], hours["eval"]["failed"]) == (2.0, 1, 1)
    assert (hours["align_mle_filter"]["device_hours"], hours["align_mle_filter"]["executions"]) == (22.0, 2)
    rwr = hours["align_rwr"]
    assert (rwr["device_hours"], rwr["executions"], rwr["not_charged_device_hours"], rwr["interrupted"]) == \
        (58.5, 1, 3.0, 1)
    table = stages_markdown(hours)
    assert "| align_rwr | 58.5000 | 26325.0 | 1 | 3.0000 | 1 interrupted |" in table
    assert "| sft | 30.0000 | 13500.0 | 1 | 1.5000 | 1 failed |" in table
    assert "| rm | 8.5000 | 3825.0 | 1 | 0.0000 | — |" in table


def test_a_stage_that_never_completed_charges_no_method(run):
    with open(run / "ledger.jsonl", "a") as handle:
        handle.write(ledger_line("align_ipo", 0.001, "failed", 30) + "\n" + ledger_line("rm", 2.0, "failed", 31)
                     + "\n" + ledger_line("align_kto", 4.0, "interrupted", 32) + "\n")
    hours = device_hours(run)
    assert [row["method"] for row in table3(hours)] == ["dpo", "dt", "mle_filter", "rwr", "ppo"]
    assert hours["align_ipo"]["failed"] == 1 and hours["align_kto"]["interrupted"] == 1
    assert shared_hours(hours) == {"sft": 30.0, "rm": 8.5, "total": 38.5}
    assert "No method to charge yet" in table3_markdown([], {}, {"total": 0.0})


def test_without_ppo_there_is_no_share(run):
    lines = [line for line in (run / "ledger.jsonl").read_text().splitlines() if '"ppo_' not in line]
    (run / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    rows = table3(device_hours(run))
    assert [r["method"] for r in rows] == ["dpo", "dt", "mle_filter", "rwr"]
    assert all(r["share_of_ppo"] is None for r in rows)


def test_a_killed_ppo_actor_is_shown_not_charged_and_its_services_make_no_method(run):
    """A killed actor left only its heartbeat (its ledger row comes when it reruns): it is
    shown, not charged; its services, though completed, served no charged actor execution:
    not charged either (superseded), and no method's cost."""
    lines = [line for line in (run / "ledger.jsonl").read_text().splitlines() if '"ppo_actor"' not in line]
    (run / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    (run / HEARTBEAT_DIR).mkdir()
    (run / HEARTBEAT_DIR / "ppo_actor.json").write_text(ledger_line("ppo_actor", 7.0, "interrupted", 40))
    # A running stage's heartbeat (the report's own, as `orlhf report` runs) is fresh: not counted.
    running = json.loads(ledger_line("report", 0.0, "interrupted"))
    (run / HEARTBEAT_DIR / "report.json").write_text(json.dumps({**running, "end": datetime.now(timezone.utc)
                                                                  .isoformat()}))
    hours = device_hours(run)
    assert "report" not in hours
    actor = hours["ppo_actor"]
    assert (actor["executions"], actor["interrupted"], actor["not_charged_device_hours"]) == (0, 1, 7.0)
    rows = table3(hours)
    assert [r["method"] for r in rows] == ["dpo", "dt", "mle_filter", "rwr"]
    assert all(r["share_of_ppo"] is None for r in rows)
    assert "| ppo_actor | 0.0000 | 0.0 | 0 | 7.0000 | 1 interrupted |" in stages_markdown(hours)
    assert (hours["ppo_critic"]["executions"], hours["ppo_critic"]["superseded"]) == (0, 1)


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


def test_cut_off_answers_are_counted_out_of_every_sampled_answer(run):
    """An evaluation of several samples per prompt (generation.n) counts cut-off answers out
    of all of them; an older results.json, without `answers`, out of its prompts."""
    results = json.loads((run / "eval" / "results.json").read_text())
    entries = side_by_side(results, None, table3(device_hours(run)))
    ppo_row = next(line for line in side_by_side_markdown(entries, results, None).splitlines()
                   if line.startswith("| ppo |"))
    assert " 3/4 | " in ppo_row
    sampled = {**results, "samples_per_prompt": 2, "answers": 8}
    ppo_row = next(line for line in side_by_side_markdown(entries, sampled, None).splitlines()
                   if line.startswith("| ppo |"))
    assert " 3/8 | " in ppo_row


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


def test_a_judge_that_graded_the_current_eval_answers_is_current(tmp_path):
    run = write_run(tmp_path / "run", judge=True)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert judge_freshness(run, JUDGE, results) == ("current", "")


def test_a_judge_older_than_the_last_completed_eval_is_stale(tmp_path):
    """eval, judge, eval again (overwriting the answers): the judge graded the old answers.
    A later eval that failed (bad input) rewrote nothing and changes nothing."""
    run = write_run(tmp_path / "run", judge=True)
    results = json.loads((run / "eval" / "results.json").read_text())
    append_ledger(run, "eval", 0.001, "failed")
    assert judge_freshness(run, JUDGE, results) == ("current", "")
    append_ledger(run, "eval", 0.1)
    state, why = judge_freshness(run, JUDGE, results)
    assert state == "stale"
    assert why == ("the judge graded eval/answers_sft.jsonl, eval/answers_dt.jsonl, eval/answers_ppo.jsonl at "
                   "2026-01-01T19:00:00+00:00, before `orlhf eval` rewrote the answers (it ended at "
                   "2026-01-01T22:00:00+00:00)")
    append_ledger(run, "judge", 0.01)  # judged again: current
    assert judge_freshness(run, JUDGE, results) == ("current", "")


def test_judged_answers_the_last_eval_did_not_write_are_stale(tmp_path):
    run = write_run(tmp_path / "run", judge=True)
    results = json.loads((run / "eval" / "results.json").read_text())
    del results["models"]["ppo"]  # eval/answers_ppo.jsonl is left from an earlier evaluation
    state, why = judge_freshness(run, JUDGE, results)
    assert state == "stale" and why.startswith("the judge graded eval/answers_ppo.jsonl, answers of models the last")


def test_a_judge_of_other_answer_files_is_not_compared_with_the_evaluation(tmp_path):
    run = write_run(tmp_path / "run")
    fastchat = {model: str(tmp_path / "mt_bench" / f"{model}.jsonl") for model in JUDGE["models"]}
    write_judge(run, JUDGE, fastchat)  # no judge row either: nothing of eval's to date it against
    assert judge_freshness(run, JUDGE, None) == ("current", "")


def test_without_its_config_or_its_ledger_row_the_judge_is_unverified(tmp_path):
    run = write_run(tmp_path / "run", judge=True)
    lines = (run / "ledger.jsonl").read_text().splitlines()
    (run / "ledger.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert judge_freshness(run, JUDGE, None) == (
        "unverified", "ledger.jsonl has no completed `orlhf judge` execution to date its results")
    write_judge(run, JUDGE, eval_answers(run, ["sft", "dt"]))  # a later judge run, of other models, failed
    assert judge_freshness(run, JUDGE, None)[0] == "unverified"
    (run / "judge" / "config.yaml").unlink()
    assert judge_freshness(run, JUDGE, None)[0] == "unverified"
    (run / "judge" / "config.yaml").write_text("answers: [\n  {model: sft,\n")
    with pytest.raises(ConfigError, match=r"judge/config.yaml:\d+: not valid YAML"):
        judge_freshness(run, JUDGE, None)


def test_judged_models_are_listed_without_an_evaluation():
    entries = side_by_side(None, JUDGE, [])
    assert [(e["model"], e["judge"]["value"]) for e in entries] == [("sft", 6.45), ("dt", 7.06), ("ppo", 7.02)]
    text = side_by_side_markdown(entries, None, JUDGE)
    assert "| dt | 7.06 ± 0.20 | — | — | — |" in text
    assert "run `orlhf eval` for the quality columns" in text


def test_nothing_to_show_is_said_not_drawn():
    text = side_by_side_markdown([], None, None)
    assert "|" not in text and text.startswith("No model to show")
    assert "run `orlhf judge`" in text and "run `orlhf eval`" in text


def test_pairwise_judging_of_every_pair_has_no_baseline_column():
    judge = {"format": "pairwise", "baseline": "", "judge_model": "j", "summary": {"games": [
        {"model": "dt", "opponent": "sft", "n": 10, "win_rate": 0.7, "win_rate_low": 0.5, "win_rate_high": 0.9}]}}
    text = side_by_side_markdown(side_by_side(None, judge, []), None, judge)
    assert "win rate vs" not in text and "judge j" not in text
    assert "every pair of models, no baseline" in text and "`format=pairwise baseline=NAME`" in text


def test_a_stale_judge_is_named_not_shown(run):
    text = side_by_side_markdown(side_by_side(None, None, table3(device_hours(run))), None, None,
                                 ("stale", "the judge graded eval/answers_dt.jsonl at T, before ..."))
    assert "judge/results.json is stale and not shown: the judge graded eval/answers_dt.jsonl" in text
    assert "no judge configured" not in text and "judge " not in text.splitlines()[0]


def test_relative_paths_are_compared_with_the_judge_run_dir(tmp_path, monkeypatch):
    """The CLI records paths as typed (run_dir=run: run/eval/answers_sft.jsonl); the report
    may run from another directory."""
    monkeypatch.chdir(tmp_path)
    run = write_run(Path("run"), judge=True)  # judge/config.yaml: run_dir "run", paths "run/eval/..."
    monkeypatch.chdir("/")
    assert judge_freshness(tmp_path / run, JUDGE, None) == ("current", "")
    append_ledger(tmp_path / run, "eval", 0.1)
    assert judge_freshness(tmp_path / run, JUDGE, None)[0] == "stale"


def test_eval_answers_the_report_cannot_place_leave_the_judge_unverified(tmp_path, monkeypatch):
    """A config mixing a relative run_dir with absolute answer paths, read from another
    directory: the answers are eval's but not found under run_dir/eval as resolved here,
    so the judge cannot be compared with the evaluation (not called current)."""
    run = write_run(tmp_path / "run", judge=True)
    write_judge(run, JUDGE, eval_answers(run, JUDGE["models"]))  # absolute answer paths
    config = (run / "judge" / "config.yaml").read_text().replace(f"run_dir: {run}", "run_dir: run")
    (run / "judge" / "config.yaml").write_text(config)
    monkeypatch.chdir("/")
    state, why = judge_freshness(run, JUDGE, None)
    assert state == "unverified" and f"{run}/eval/answers_sft.jsonl, an eval answers file outside {run}/eval" in why


def test_an_unverified_judge_is_shown_with_the_reason():
    text = side_by_side_markdown(side_by_side(None, JUDGE, []), None, JUDGE,
                                 ("unverified", "judge/config.yaml, which names the answer files, is missing"))
    assert "| judge gpt-4 (mean score ± s.e.) |" in text and "| ppo | 7.02 ± 0.25 |" in text
    assert ("Judge: gpt-4 (single format); details in judge/results.md. Not verified against the evaluation: "
            "judge/config.yaml, which names the answer files, is missing.") in text
