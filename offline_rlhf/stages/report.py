"""`orlhf report`: `run_dir/report.md` and `report.json` (evaluation, device-hours per
method as in the paper's Table 3, reward distribution, loss curves) from what the stages wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.evaluation import ReportConfig
from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.eval.report import device_hours, loss_curves, report_markdown, table3
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.ledger import LEDGER, read_ledger
from offline_rlhf.runtime import stage_runtime
from offline_rlhf.stage_support import mark_done


def main(cfg: ReportConfig) -> int:
    run_dir = Path(cfg.run_dir)
    if not read_ledger(run_dir):
        raise ConfigError("run_dir", f"{run_dir} has no {LEDGER} (no stage has run there)", "pass a run directory")
    with stage_runtime("report", cfg.run_dir, ParallelConfig(), None, cfg) as (rt, _):
        hours = device_hours(run_dir)
        rows = table3(hours)
        results_path = run_dir / "eval" / "results.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else None
        figures = {"loss_curves": loss_curves(run_dir, rt.stage_dir / "loss_curves.png")}
        histogram = run_dir / "label" / "reward_histogram.png"
        if histogram.exists():
            figures["reward_distribution"] = Path(shutil.copy(histogram, rt.stage_dir / "reward_histogram.png"))
        report = {"run_dir": str(run_dir), "evaluation": results, "device_hours_by_stage": hours, "table3": rows,
                  "figures": {k: str(v) for k, v in figures.items() if v}}
        write_atomic(run_dir / "report.json", json.dumps(report, indent=2))
        write_atomic(run_dir / "report.md", report_markdown(run_dir, results, rows, hours, figures))
        mark_done(rt, run_dir / "report.md")
        rt.log(f"report: {run_dir / 'report.md'}")
    return 0
