"""`orlhf seeds-report run_dir=R`: every method across training seeds, from the `report.json`
of each replicate (`R/seed_<s>/`, one complete run per seed, as `pipeline.seeds` writes
them; or the folders `replicates=` names), into `R/seeds_report.md` and `R/seeds_report.json`.
The statistics are in `offline_rlhf.eval.seeds`."""

from __future__ import annotations

import json
from pathlib import Path

from offline_rlhf.config.evaluation import SeedsReportConfig
from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.eval.seeds import (
    LEVEL,
    read_replicates,
    replicate_dirs,
    require_replicates,
    seeds_markdown,
    settings_that_differed,
    summarize_seeds,
)
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.runtime import stage_runtime
from offline_rlhf.stage_support import mark_done

STAGE = "seeds-report"  # its folder R/seeds-report/ (the launcher's default: the stage's name)


def main(cfg: SeedsReportConfig) -> int:
    run_dir = Path(cfg.run_dir)
    dirs = replicate_dirs(run_dir, list(cfg.replicates))
    used, skipped = read_replicates(dirs, cfg.strict)
    require_replicates(used, skipped)  # before the stage folder: a refusal leaves nothing behind
    with stage_runtime(STAGE, cfg.run_dir, ParallelConfig(), None, cfg) as (rt, _):
        summary = summarize_seeds(used)
        differed = settings_that_differed([(r.name, r.path) for r in used])
        report = {"run_dir": str(run_dir), "level": LEVEL,
                  "replicates": [{"name": r.name, "path": str(r.path)} for r in used], "skipped": skipped,
                  **summary, "settings_that_differed": differed}
        if rt.is_main:
            write_atomic(run_dir / "seeds_report.json", json.dumps(report, indent=2))
            write_atomic(run_dir / "seeds_report.md", seeds_markdown(run_dir, summary, used, skipped, differed))
        mark_done(rt, run_dir / "seeds_report.md")
        rt.log(f"seeds-report: {len(used)} replicates, {len(skipped)} skipped -> {run_dir / 'seeds_report.md'}")
    return 0
