"""Submit a pipeline as chained sbatch jobs and ask Slurm about them afterwards.

A stage waits for the stages whose outputs it reads (launcher.plan.waits_for) with `afterok`
and `--kill-on-invalid-dep=yes` (without it a job whose dependency failed stays PENDING
forever): stages that do not read each other's outputs run side by side, and a failed stage
cancels only those that need it. With seeds each replicate is a chain of its own and
`seeds-report` waits for the last job of every one.
With `cluster.max_attempts > 1` each stage is submitted that many times: later attempts also
wait on `singleton` (the previous attempt of the same job name) and resume from the stage's
latest checkpoint; the next stage waits on the last attempt, which succeeds only if the
stage completed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.plan import StagePlan
from launcher.ppo import prepare_stage_dir
from launcher.render import COMPLETE_MARKER, render_script
from launcher.schema import ClusterConfig, LaunchError

LAUNCH_RECORD = "launch.json"
DRY_RUN_DIR = "dry_run"  # under run_dir: what a dry run renders
SBATCH_TIMEOUT_S = 60  # a controller that does not answer in this long is treated as down
CONTROLLER_HINT = "is slurmctld reachable? (scontrol ping)"


@dataclass
class SubmittedStage:
    name: str
    script: str
    job_ids: list[str]


def write_stage_files(plan: StagePlan, cluster: ClusterConfig, python: str) -> Path:
    """`submission.sh` in the stage's folder (for the PPO heterogeneous job also its token).
    The stage's `config.yaml` is the stage's own: it writes it when it runs."""
    plan.stage_dir.mkdir(parents=True, exist_ok=True)
    script = plan.stage_dir / "submission.sh"
    script.write_text(render_script(plan, cluster, python))
    script.chmod(0o755)
    if plan.components:
        prepare_stage_dir(plan.stage_dir, plan.components)
    return script


def write_dry_run(plan: StagePlan, cluster: ClusterConfig, python: str, run_dir: Path) -> Path:
    """A dry run's script and resolved config, under run_dir/dry_run/ where no stage or later
    launch looks: the stage folders (config.yaml, markers, token) stay as they are."""
    folder = run_dir / DRY_RUN_DIR / plan.stage_dir.relative_to(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(plan.config_yaml)
    script = folder / "submission.sh"
    script.write_text(render_script(plan, cluster, python))
    return script


def submit_chain(plans: list[StagePlan], scripts: list[Path], waits: list[list[int]],
                 max_attempts: int) -> list[SubmittedStage]:
    """Submit in pipeline order, each stage after the last attempts of those it waits for
    (`waits[i]`: positions in `plans`, from launcher.plan.waits_for); if any sbatch fails,
    times out or is interrupted (Ctrl-C), cancel what was already submitted. Each stage
    forgets an earlier launch's completion marker just before its first attempt is submitted."""
    submitted: list[SubmittedStage] = []
    try:
        for plan, script, needed in zip(plans, scripts, waits, strict=True):
            (plan.stage_dir / COMPLETE_MARKER).unlink(missing_ok=True)
            after = [f"afterok:{':'.join(submitted[position].job_ids[-1] for position in needed)}"] if needed else []
            ids: list[str] = []
            submitted.append(SubmittedStage(plan.name, str(script), ids))
            for attempt in range(max_attempts):
                ids.append(sbatch(plan.name, script, after + (["singleton"] if attempt else [])))
    except (LaunchError, KeyboardInterrupt) as err:
        jobs = [job for stage in submitted for job in stage.job_ids]
        cancel(jobs)
        cancelled = f"cancelled job(s) {' '.join(jobs)}" if jobs else "nothing was submitted"
        if isinstance(err, KeyboardInterrupt):
            raise LaunchError("orlhf launch", "interrupted while submitting", cancelled) from None
        raise LaunchError(err.key, str(err).removeprefix(f"{err.key}: "), cancelled) from None
    return submitted


def sbatch(stage: str, script: Path, dependencies: list[str]) -> str:
    command = ["sbatch", "--parsable"]
    if dependencies:
        command += [f"--dependency={','.join(dependencies)}", "--kill-on-invalid-dep=yes"]
    key = f"stage {stage}: sbatch"
    try:
        proc = _run([*command, str(script)], SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        # sbatch may have queued the job before it hung: cancel any id it printed.
        printed = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        queued = re.findall(r"^(\d+)", printed, flags=re.M)
        cancel(queued)
        unknown = "" if queued else "; a job it may have queued is unknown to the launcher: check squeue --me"
        raise LaunchError(key, f"no answer in {SBATCH_TIMEOUT_S:g} s" + "".join(f" (cancelled job {job} it queued)"
                                                                         for job in queued),
                          CONTROLLER_HINT + unknown) from None
    if proc.returncode != 0:
        raise LaunchError(key, _first_line(proc.stderr) or f"exit code {proc.returncode}", _sbatch_hint(proc.stderr))
    return proc.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"


# What sbatch's refusal names -> the setting behind it, checked in order (an account error
# also names the partition, a QOS policy error time limits). The values come from the
# #SBATCH lines the launcher wrote (cluster.*, a stage's nodes and time_limit) or from
# sbatch's own input variables (SBATCH_QOS, ...).
SBATCH_REFUSALS = (
    (r"--mem\b|memory", "cluster.mem: use Slurm's syntax (500G, 0 for all of a node's memory) within what the "
                       "partition's nodes have"),
    (r"\baccount\b", "cluster.account (with cluster.partition): use an account you may charge on that "
                    "partition (sacctmgr show assoc user=$USER)"),
    (r"partition", "cluster.partition: use a partition of this cluster (sinfo -s)"),
    (r"qos", "the QOS: SBATCH_QOS in the submitting shell, or the account's default"),
    (r"--time\b|time limit", "cluster.time_limit or the stage's time_limit: within the partition's MaxTime "
                             "(sinfo -o '%P %l')"),
    (r"gres|generic resource|gpu", "cluster.gpus_per_node: as many as the partition's nodes have, or null for none"),
    (r"reservation", "the reservation: SBATCH_RESERVATION in the submitting shell"),
    (r"feature|constraint", "the node features: SBATCH_CONSTRAINT in the submitting shell"),
    (r"cpu", "cluster.cpus_per_task: at most the CPUs of the partition's nodes"),
    (r"node count|nodes", "the stage's nodes: at most the partition's node count"),
    (r"node configuration is not available", "the resources asked for per node (cluster.gpus_per_node, "
     "cpus_per_task, mem) or the stage's nodes exceed what the partition's nodes have"),
)


def _sbatch_hint(stderr: str) -> str:
    """What to check for a refused submission: the controller when sbatch could not reach
    it, else the setting sbatch's message names (sbatch prints what it refused first)."""
    if re.search(r"contact|connect|controller", stderr, flags=re.I):
        return CONTROLLER_HINT
    for line in (line for line in stderr.splitlines() if line.strip()):
        for pattern, setting in SBATCH_REFUSALS:
            if re.search(pattern, line, flags=re.I):
                return f"check {setting}"
    return ("check the stage's #SBATCH lines (cluster.partition, account, mem, gpus_per_node, cpus_per_task, "
            "time_limit) and any SBATCH_* variables of the submitting shell: only sbatch checks them")


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids])


def active_jobs(run_dir: Path) -> list[str]:
    """The jobs of the launch recorded in run_dir that are still queued or running."""
    if not (run_dir / LAUNCH_RECORD).exists():
        return []
    recorded = [job for stage in read_launch_record(run_dir) for job in stage.job_ids]
    proc = _run(["squeue", "-h", "-o", "%i", f"--jobs={','.join(recorded)}"])
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:  # every job long gone
        raise LaunchError("squeue", _first_line(proc.stderr) or f"exit code {proc.returncode}")
    queued = {line.strip().split("+")[0] for line in proc.stdout.splitlines()}  # a het job: id+component
    return [job for job in recorded if job in queued]


def write_launch_record(run_dir: Path, pipeline: str, stages: list[SubmittedStage]) -> Path:
    """Atomically (temp file + rename), so `status` never reads half a record; readable by
    everyone sharing the project folder (job ids and script paths, no secret)."""
    record = {"pipeline": pipeline, "stages": [asdict(stage) for stage in stages]}
    path = run_dir / LAUNCH_RECORD
    with tempfile.NamedTemporaryFile("w", dir=run_dir, prefix=".launch.", delete=False) as handle:
        json.dump(record, handle, indent=2)
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, path)
    return path


def read_launch_record(run_dir: Path) -> list[SubmittedStage]:
    path = run_dir / LAUNCH_RECORD
    if not path.exists():
        raise LaunchError("run_dir", f"no {LAUNCH_RECORD} in {run_dir}: status lists the jobs of a Slurm launch",
                          "a local run's stages log to <stage>/launch.log, its device-hours are in ledger.jsonl "
                          "(`orlhf report` sums them)")
    return [SubmittedStage(**stage) for stage in json.loads(path.read_text())["stages"]]


@dataclass(frozen=True)
class JobInfo:
    state: str  # Slurm's state word: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    elapsed_s: float | None
    gpus: int  # GPUs allocated to the whole job
    reason: str = ""  # why a pending job waits (Slurm's Reason: Resources, Priority, Dependency, ...)


def query_job(job_id: str) -> JobInfo | None:
    """scontrol knows active and recently ended jobs (MinJobAge); sacct knows older ones when
    there is accounting; `sacct -c` reads the job-completion log when there is none."""
    for query in (_from_scontrol, _from_sacct, _from_jobcomp):
        info = query(job_id)
        if info is not None:
            return info
    return None


def _from_scontrol(job_id: str) -> JobInfo | None:
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    fields = dict(re.findall(r"(\S+?)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}
    if "JobState" not in fields:
        return None
    reason = fields.get("Reason", "") if fields["JobState"] == "PENDING" else ""
    return JobInfo(fields["JobState"], _seconds(fields.get("RunTime", "")),
                   _gpus_in_tres(fields.get("AllocTRES") or fields.get("TRES", "")),
                   "" if reason in ("None", "(null)") else reason)


def _from_sacct(job_id: str) -> JobInfo | None:
    return _sacct_row(["sacct", "-X", "-n", "-P", "-j", job_id, "--format=State,Elapsed,AllocTRES"])


def _from_jobcomp(job_id: str) -> JobInfo | None:
    return _sacct_row(["sacct", "-c", "-n", "-P", "-j", job_id, "--format=State,Elapsed"])


def _sacct_row(command: list[str]) -> JobInfo | None:
    proc = _run(command)
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []
    if not rows:
        return None
    state, elapsed, *tres = rows[-1]  # the job's latest record (a requeued job has several)
    return JobInfo(state.split()[0], _seconds(elapsed), _gpus_in_tres(tres[0] if tres else ""))


def _seconds(elapsed: str) -> float | None:
    """Slurm durations: [D-]HH:MM:SS or MM:SS."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", elapsed.strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _gpus_in_tres(tres: str) -> int:
    match = re.search(r"gres/gpu=(\d+)", tres)
    return int(match.group(1)) if match else 0


def _run(command: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        if command[0] == "sbatch":  # its caller cancels what it may have submitted
            raise
        raise LaunchError(command[0], f"no answer in {timeout_s:g} s", CONTROLLER_HINT) from err
    except FileNotFoundError:
        raise LaunchError("cluster.kind", f"{command[0]} not found", "is this a Slurm login node? "
                          "(scripts/local_slurm.sh sets up a single-node Slurm)") from None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
