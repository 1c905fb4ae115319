"""`orlhf report` through the CLI on a hand-written run directory
(tests/unit/eval/report_fixtures.py): the side-by-side table with PPO, Table 3 with DT's
12.3% of PPO's device-hours, SFT and RM shown once, failed executions not charged, the
judge column or a plain "no judge configured", a real `orlhf judge` whose answers a later
`orlhf eval` rewrote (stale: not shown), the chart, and a damaged judge file as one line."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from http.server import ThreadingHTTPServer

from offline_rlhf.cli import main
from tests.integration.test_judge_stage import CLI, JUDGE_PROMPTS, REPO, Handler, Judge
from tests.unit.eval.report_fixtures import ledger_line, write_run

PNG = b"\x89PNG\r\n\x1a\n"


def row(text: str, first_cell: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))


def section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_report_sets_every_method_against_ppo(tmp_path):
    run = write_run(tmp_path / "run")
    assert main(["report", f"run_dir={run}"]) == 0
    report = json.loads((run / "report.json").read_text())
    ppo = next(m for m in report["methods"] if m["model"] == "ppo")
    assert ppo["quality"]["gold"]["mean"] == 2.25 and ppo["device_hours"] == 730.0
    assert [r["method"] for r in report["table3"]] == ["dpo", "dt", "mle_filter", "rwr", "ppo"]
    assert report["shared_device_hours"] == {"sft": 30.0, "rm": 8.5, "total": 38.5} and report["judge"] is False
    text = (run / "report.md").read_text()
    side = section(text, "Methods side by side")
    assert row(side, "ppo").startswith("| ppo | 2.250 ± 0.479 | +0.750 ± 0.479 | 0.75 [0.50, 1.00] |")
    assert row(side, "ppo").endswith("| 3/4 | 730.0000 | 100.0% |")
    assert row(side, "dt").endswith("| 1/4 | 90.0000 | 12.3% |")
    assert row(side, "sft").endswith("| 0/4 | shared | — |")
    assert row(side, "dt_low (`<rm_score> -1.5`)").endswith("| 2/4 | — | — |")
    assert row(side, "rwr") == "| rwr | — | — | — | — | 89.0000 | 12.2% |"
    assert "no judge configured" in side
    table = section(text, "Device-hours per method")
    assert row(table, "dt") == ("| dt | 30.5000 | 59.5000 | 90.0000 | 12.3% | generate 20.0000 + label 10.0000 + "
                                "mix 0.5000 + align_dt 59.5000 |")
    assert row(table, "ppo").startswith("| ppo | 0.0000 | 730.0000 | 730.0000 | 100.0% | ppo_actor 400.0000 + ")
    assert "Shared by every method, PPO included (not in the totals): sft 30.0000 + rm 8.5000 = 38.5000." in table
    assert text.count("sft 30.0000") == 1  # once in Table 3's shared line, in no method's stages
    assert row(table, "sft") == "| sft | 30.0000 | 13500.0 | 1 | 1.5000 | 1 failed |"  # the failed first try
    # the failed eval with a bad input is not charged, but shown
    assert row(table, "eval") == "| eval | 2.0000 | 900.0 | 1 | 0.2500 | 1 failed |"
    assert (run / "report" / "device_hours_and_quality.png").read_bytes().startswith(PNG)
    assert "![device-hours and quality per method](report/device_hours_and_quality.png)" in text


def test_report_shows_the_judge_when_one_ran(tmp_path):
    run = write_run(tmp_path / "run", judge=True)
    assert main(["report", f"run_dir={run}"]) == 0
    side = section((run / "report.md").read_text(), "Methods side by side")
    assert "| judge gpt-4 (mean score ± s.e.) |" in side.splitlines()[4]
    assert "| 7.02 ± 0.25 | 3/4 | 730.0000 |" in row(side, "ppo")
    assert "| — | 2/4 |" in row(side, "dt_low (`<rm_score> -1.5`)")
    assert "no judge configured" not in side and "Judge: gpt-4 (single format)" in side
    assert json.loads((run / "report.json").read_text())["judge"] is True


def test_a_judge_that_ran_and_did_not_finish_is_not_called_unconfigured(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "judge").mkdir()
    (run / "judge" / "config.yaml").write_text("run_dir: x\n")  # what a failed `orlhf judge` leaves
    assert main(["report", f"run_dir={run}"]) == 0
    side = section((run / "report.md").read_text(), "Methods side by side")
    assert "no judge configured" not in side
    assert f"LLM judge: `orlhf judge` has not finished ({run / 'judge'} holds no results.json: it is running, " \
           "or its last execution failed or was stopped" in side
    assert json.loads((run / "report.json").read_text())["judge_check"]["state"] == "unfinished"


def test_a_damaged_judge_file_is_one_line(tmp_path, capsys):
    run = write_run(tmp_path / "run", judge=True)
    (run / "judge" / "results.json").write_text('{"format": "single",\n  "summary": ')
    assert main(["report", f"run_dir={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"orlhf report: error: run_dir: {run / 'judge' / 'results.json'}:2: not valid JSON")
    assert "\n" not in err


@contextmanager
def judge_server():
    """A real HTTP judge on 127.0.0.1 that rates every answer 7."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.judge = Judge(lambda prompt: "Fine. Rating: [[7]]")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_a_judge_of_answers_that_eval_rewrote_is_not_shown(tmp_path):
    """The reviewer's case: eval, `orlhf judge` on its answers, eval again on other prompts
    (rewriting the answers): the report names the stale judge instead of showing its scores."""
    run = write_run(tmp_path / "run")
    prompts = ["Describe the sea.", "Name a planet."]
    (tmp_path / "question.jsonl").write_text("".join(
        json.dumps({"question_id": i, "category": "writing", "turns": [p]}) + "\n" for i, p in enumerate(prompts)))
    for model in ("sft", "dt"):
        (run / "eval" / f"answers_{model}.jsonl").write_text("".join(
            json.dumps({"prompt": p, "response": f"{model} answer", "finished": True}) + "\n" for p in prompts))
    with judge_server() as url:
        judged = subprocess.run(
            [sys.executable, "-c", CLI, "judge", f"run_dir={run}", f"questions={tmp_path / 'question.jsonl'}",
             f"answers=[{{model: sft, path: '{run}/eval/answers_sft.jsonl'}}, "
             f"{{model: dt, path: '{run}/eval/answers_dt.jsonl'}}]", f"judge_prompts={JUDGE_PROMPTS}",
             "baseline=sft", f"judge.base_url={url}", "judge.model=judge-x"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert judged.returncode == 0, judged.stderr
    assert main(["report", f"run_dir={run}"]) == 0
    side = section((run / "report.md").read_text(), "Methods side by side")
    assert "| judge judge-x (mean score ± s.e.) |" in side and "| 7.00 ± 0.00 | 1/4 | 90.0000 |" in row(side, "dt")

    now = datetime.now(timezone.utc).isoformat()  # eval again, after the judge ran
    row_now = json.loads(ledger_line("eval", 0.01))
    with open(run / "ledger.jsonl", "a") as handle:
        handle.write(json.dumps({**row_now, "start": now, "end": now}) + "\n")
    assert main(["report", f"run_dir={run}"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["judge"] is False and report["judge_check"]["state"] == "stale"
    side = section((run / "report.md").read_text(), "Methods side by side")
    assert "judge-x" not in side and "7.00" not in side
    assert "judge/results.json is stale and not shown: the judge graded eval/answers_sft.jsonl, " \
           "eval/answers_dt.jsonl at " in side
    assert f"before `orlhf eval` rewrote the answers (it ended at {now})" in side
