"""`orlhf report`: `run_dir/report.md` and `report.json` (every method side by side in
quality and device-hours, PPO included; the device-hours split as in the paper's Table 3;
reward distribution; loss curves) from what the stages wrote: `ledger.jsonl`,
`eval/results.json` and, when `orlhf judge` ran, `judge/results.json` (not shown when a later
`orlhf eval` rewrote the answers it graded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.evaluation import ReportConfig
from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.eval.report import (
    cost_quality_chart,
    device_hours,
    iterative_rounds,
    judge_freshness,
    loss_curves,
    report_markdown,
    shared_hours,
    side_by_side,
    table3,
)
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.ledger import LEDGER, read_ledger
from offline_rlhf.runtime import stage_runtime
from offline_rlhf.stage_support import mark_done


def read_results(path: Path) -> dict | None:
    """A stage's results.json, None when that stage has not run; unreadable JSON is an error
    naming the file."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("run_dir", f"{path}:{err.lineno}: not valid JSON ({err.msg})",
                          "rerun the stage that wrote it") from None


def judge_state(run_dir: Path, judge: dict | None, results: dict | None) -> tuple[str, str]:
    """Whether the judge's results grade the evaluated answers (`judge_freshness`); without
    results, whether `orlhf judge` ran here and ended before writing them."""
    if judge is not None:
        return judge_freshness(run_dir, judge, results)
    if (run_dir / "judge" / "config.yaml").exists():
        return "unfinished", f"{run_dir / 'judge'} holds no results.json"
    return "none", ""


def main(cfg: ReportConfig) -> int:
    run_dir = Path(cfg.run_dir)
    if not read_ledger(run_dir):
        raise ConfigError("run_dir", f"{run_dir} has no {LEDGER} (no stage has run there)", "pass a run directory")
    with stage_runtime("report", cfg.run_dir, ParallelConfig(), None, cfg) as (rt, _):
        hours = device_hours(run_dir)
        rows = table3(hours)
        results = read_results(run_dir / "eval" / "results.json")
        judge = read_results(run_dir / "judge" / "results.json")
        judge_check = judge_state(run_dir, judge, results)
        if judge_check[0] == "stale":
            judge = None  # never shown as if it graded the answers behind the evaluation
        entries = side_by_side(results, judge, rows, run_dir)
        figures = {"cost_quality": cost_quality_chart(entries, rows, results,
                                                      rt.stage_dir / "device_hours_and_quality.png"),
                   "loss_curves": loss_curves(run_dir, rt.stage_dir / "loss_curves.png")}
        histogram = run_dir / "label" / "reward_histogram.png"
        if histogram.exists():
            figures["reward_distribution"] = Path(shutil.copy(histogram, rt.stage_dir / "reward_histogram.png"))
        rounds = iterative_rounds(run_dir, rows, results)
        report = {"run_dir": str(run_dir), "methods": entries, "table3": rows, "rounds": rounds,
                  "shared_device_hours": shared_hours(hours), "judge": judge is not None,
                  "judge_check": {"state": judge_check[0], "why": judge_check[1]}, "evaluation": results,
                  "device_hours_by_stage": hours, "figures": {k: str(v) for k, v in figures.items() if v}}
        write_atomic(run_dir / "report.json", json.dumps(report, indent=2))
        write_atomic(run_dir / "report.md", report_markdown(run_dir, results, judge, judge_check, entries, rows, hours,
                                                                 figures, rounds))
        mark_done(rt, run_dir / "report.md")
        rt.log(f"report: {run_dir / 'report.md'}")
    return 0
