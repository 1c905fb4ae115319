"""`orlhf launch status run_dir=DIR`: each job's state and, once finished, its device-hours.

Device-hours come from the rows the stages append to `run_dir/ledger.jsonl` and the ledgers
of its replicates and later rounds (`seed_<s>/`, `round_<r>/`, `seed_<s>/round_<r>/`; a
resumed stage adds a row per execution, so rows are summed per job); without a row, from Slurm's elapsed
time x allocated GPUs. A job whose rows come from several ledger stages (the PPO stage's
heterogeneous job: ppo_actor, ppo_critic, ppo_reference, ppo_reward, every row carrying the
job's id) is followed by one indented row per module with that module's hours. A pending
job's state carries Slurm's reason for the wait: `PENDING (Dependency)`, `PENDING (Resources)`,
`PENDING (PartitionConfig)` (the job asks for more than the partition allows: it never starts).
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher.slurm import JobInfo, query_job, read_launch_record
from launcher.table import format_table

LEDGER = "ledger.jsonl"
# Where the stages of a run write their ledgers: the run's own, its replicates' (launcher.seeds)
# and later rounds' (launcher.rounds).
LEDGERS = (LEDGER, f"round_*/{LEDGER}", f"seed_*/{LEDGER}", f"seed_*/round_*/{LEDGER}")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def status_rows(run_dir: Path) -> list[tuple[str, str, str, str]]:
    modules = module_hours(run_dir)
    ledger = ledger_hours(modules)
    rows = []
    for stage in read_launch_record(run_dir):
        for attempt, job_id in enumerate(stage.job_ids, 1):
            label = stage.name if len(stage.job_ids) == 1 else f"{stage.name} [{attempt}/{len(stage.job_ids)}]"
            info = query_job(job_id)
            state = (f"{info.state} ({info.reason})" if info.reason else info.state) if info else "UNKNOWN"
            rows.append((label, job_id, state, device_hours(job_id, info, ledger)))
            if len(modules.get(job_id, {})) > 1:
                rows += [(f"  {module}", job_id, state, f"{hours:.4f} (ledger)")
                         for module, hours in sorted(modules[job_id].items())]
    return rows


def show_status(run_dir: Path) -> int:
    print(format_table([("STAGE", "JOB", "STATE", "DEVICE-HOURS"), *status_rows(run_dir)]))
    return 0


def ledger_hours(modules: dict[str, dict[str, float]]) -> dict[str, float]:
    """Job id -> summed device_hours of the ledger rows that carry it, from `module_hours`
    (one reading of the ledgers for a job's total and its modules' rows)."""
    return {job: sum(hours.values()) for job, hours in modules.items()}


def module_hours(run_dir: Path) -> dict[str, dict[str, float]]:
    """Job id -> ledger stage -> summed device_hours of the rows that carry both."""
    hours: dict[str, dict[str, float]] = {}
    lines = [line for pattern in LEDGERS for path in sorted(run_dir.glob(pattern)) for line in
             path.read_text().splitlines()]
    for row in (json.loads(line) for line in lines if line.strip()):
        if row.get("job_id") is not None:
            stages = hours.setdefault(str(row["job_id"]), {})
            stages[row["stage"]] = stages.get(row["stage"], 0.0) + float(row["device_hours"])
    return hours


def device_hours(job_id: str, info: JobInfo | None, ledger: dict[str, float]) -> str:
    if job_id in ledger:
        return f"{ledger[job_id]:.4f} (ledger)"
    if info and info.state in FINISHED and info.gpus and info.elapsed_s is not None:
        return f"{info.gpus * info.elapsed_s / 3600:.4f} (slurm)"
    return "-"
