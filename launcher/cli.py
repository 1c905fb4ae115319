"""`orlhf launch`: run a pipeline locally or as chained Slurm jobs; `orlhf launch status`.

Imports neither torch nor offline_rlhf: stages are validated and run in subprocesses.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from launcher.compose import compose_launch
from launcher.local import forget_if_complete, run_locally, stages_to_run
from launcher.plan import StagePlan, plan_pipeline, resolved_run_dir, run_dir_override, waits_among
from launcher.schema import CONFIG_DIR_FLAG, ClusterConfig, LaunchConfig, LaunchError
from launcher.slurm import (
    LAUNCH_RECORD,
    active_jobs,
    submit_chain,
    write_dry_run,
    write_launch_record,
    write_stage_files,
)
from launcher.status import show_status
from launcher.table import format_table

DRY_RUN = "--dry-run"
USAGE = """\
usage: orlhf launch pipeline=NAME [cluster=local|slurm|local_slurm] [run_dir=DIR] [key=value ...] [--dry-run]
                    [--config-dir DIR]
       orlhf launch status run_dir=DIR

Pipelines are conf/pipeline/*.yaml, clusters conf/cluster/*.yaml; keys are in launcher/schema.py.
--config-dir DIR adds your own configs (DIR/pipeline/NAME.yaml, DIR/cluster/NAME.yaml, DIR/model/...)
beside the shipped ones, for the launcher and every stage.
  orlhf launch pipeline=offline_dt cluster=slurm cluster.partition=batch cluster.account=proj
  orlhf launch pipeline=demo 'pipeline.seeds=[0,1,2]'   (once per training seed in run_dir/seed_<s>/, then seeds-report)
--dry-run (or cluster.dry_run=true) runs or submits nothing; on Slurm it writes each script and resolved
config under run_dir/dry_run/ and leaves the stage folders as they are."""


def main(argv: list[str]) -> int:
    if not argv or "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    config_dirs = [arg.split("=", 1)[1] for arg in argv if arg.startswith(CONFIG_DIR_FLAG + "=")]
    argv = [arg for arg in argv if not arg.startswith(CONFIG_DIR_FLAG + "=")]
    try:
        unknown = next((arg for arg in argv if arg.startswith("-") and arg != DRY_RUN), None)
        if unknown is not None:
            raise LaunchError(unknown, "unknown option", f"the options are {DRY_RUN}, {CONFIG_DIR_FLAG} DIR and --help")
        if argv[:1] == ["status"]:  # reads the run's records only: config folders change nothing
            return show_status(_status_run_dir(argv[1:]))
        return launch(argv, config_dirs)
    except LaunchError as err:
        print(f"orlhf launch: error: {err}", file=sys.stderr)
        return 2


def launch(argv: list[str], config_dirs: list[str]) -> int:
    """`argv`: overrides and --dry-run; `config_dirs`: the user's config folders (absolute)."""
    cfg = compose_launch([arg for arg in argv if arg != DRY_RUN], config_dirs)
    dry_run = DRY_RUN in argv or cfg.cluster.dry_run
    print(f"pipeline {cfg.pipeline.name}: checking {len(cfg.pipeline.stages)} stage(s)...", flush=True)  # seconds each
    plans = plan_pipeline(cfg, config_dirs)
    run_dir = resolved_run_dir(cfg)
    print(f"pipeline {cfg.pipeline.name}: {len(plans)} stage(s) validated; run_dir {run_dir}", flush=True)
    python = interpreter(cfg.cluster)
    if cfg.cluster.kind == "local":
        return run_locally(plans, python, dry_run)
    return launch_on_slurm(cfg, plans, run_dir, python, dry_run)


def launch_on_slurm(cfg: LaunchConfig, plans: list[StagePlan], run_dir: Path, python: str, dry_run: bool) -> int:
    """Submits the stages a local run would run (`stages_to_run`), never over a chain still
    queued or running in the same run_dir. A dry run writes only run_dir/dry_run/."""
    runs = stages_to_run(plans)
    for plan in (plan for plan, run in zip(plans, runs) if not run):
        print(f"{plan.name}: already complete, skipped", flush=True)
    todo = [plan for plan, run in zip(plans, runs) if run]
    if not todo:
        print("every stage is complete; nothing to submit")
        return 0
    waits = waits_among(plans, runs)
    after = [", ".join(todo[position].name for position in needed) or "-" for needed in waits]
    if dry_run:
        rows = [(plan.name, "(dry run)", names, str(write_dry_run(plan, cfg.cluster, python, run_dir)))
                for plan, names in zip(todo, after)]
        print(format_table([("STAGE", "JOB", "AFTER", "SCRIPT"), *rows]))
        return 0
    status = f"orlhf launch status {shlex.quote(run_dir_override(run_dir))}"
    running = active_jobs(run_dir)
    if running:
        raise LaunchError("run_dir", f"job(s) {' '.join(running)} of the launch recorded in {run_dir / LAUNCH_RECORD} "
                          "are still pending or running", f"wait for them ({status}) or cancel them: "
                          f"scancel {' '.join(running)}")
    for plan in todo:
        forget_if_complete(plan)
    scripts = [write_stage_files(plan, cfg.cluster, python) for plan in todo]
    submitted = submit_chain(todo, scripts, waits, cfg.cluster.max_attempts)
    write_launch_record(run_dir, cfg.pipeline.name, submitted)
    print(format_table([("STAGE", "JOB", "AFTER", "SCRIPT"),
                        *((s.name, ",".join(s.job_ids), names, s.script) for s, names in zip(submitted, after))]))
    print(f"submitted; follow with: {status}")
    return 0


def interpreter(cluster: ClusterConfig) -> str:
    """Jobs on the host use this interpreter (a venv on a shared filesystem resolves the same
    on every node); inside a container, the image's `python`."""
    return cluster.python or ("python" if cluster.container_image else sys.executable)


def _status_run_dir(args: list[str]) -> Path:
    unknown = [arg.split("=", 1)[0] for arg in args if not arg.startswith("run_dir=")]
    if unknown or len(args) != 1:
        raise LaunchError(unknown[0] if unknown else "run_dir", "status takes exactly one run_dir=DIR")
    return Path(_hydra_string(args[0])).expanduser().resolve()


def _hydra_string(override: str) -> str:
    """Read like `orlhf launch run_dir=...`, so the quoting that launched a run finds it again."""
    try:
        value = OverridesParser.create().parse_override(override).value()
    except OverrideParseException:
        value = None
    if not isinstance(value, str):
        raise LaunchError("run_dir", f"{override!r} is not one path", "quote it: \"run_dir='/runs/a,b'\"")
    return value
