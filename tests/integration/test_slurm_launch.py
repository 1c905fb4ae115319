"""`orlhf launch` against the real Slurm of scripts/local_slurm.sh (two simulated nodes).

Skipped only where Slurm can be neither reused nor installed and started (not root, or no
apt-get); CI installs it beforehand, so there these tests run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.status import FINISHED

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"
POLL_TIMEOUT_S = 120
# A failure only the running job can see: launch checks that `mix`'s input exists, but not
# that it holds labeled JSON (this README does not), so the job fails with a data error.
# (Each entry is another stage: a stage writes its own folder, run_dir/<stage>.)
FAILING_CHAIN = "pipeline.stages=[%s]" % ", ".join([
    "{stage: smoke, nproc: 2, overrides: ['parallel.tp=2']}",
    "{stage: mix, overrides: ['input=%s']}" % (REPO / "README.md"),
    "{stage: task}",
])


def local_slurm(action: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(LOCAL_SLURM), action], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"local_slurm.sh {action} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def slurm():
    """Reuse a running local Slurm; otherwise install (if needed), start, and stop it after."""
    if local_slurm("status", check=False).returncode == 0:
        yield
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("a local Slurm needs root and apt-get (scripts/local_slurm.sh install)")
    local_slurm("install")
    local_slurm("start")
    yield
    local_slurm("stop")


def orlhf_launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offline_rlhf.cli", "launch", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def launch(run_dir: Path, *overrides: str) -> dict[str, str]:
    """Submit and return stage -> job id from launch.json (via the status table)."""
    proc = orlhf_launch("pipeline=smoke", "cluster=local_slurm", f"run_dir={run_dir}", *overrides)
    assert proc.returncode == 0, proc.stderr
    return {stage: job for stage, job, _ in status_rows(run_dir)}


def status_rows(run_dir: Path) -> list[tuple[str, str, str]]:
    """(stage, job, state) rows of `orlhf launch status`, cut at the header's column starts
    (a stage label such as "smoke [1/2]" holds a space)."""
    proc = orlhf_launch("status", f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    header, *lines = proc.stdout.splitlines()
    starts = [header.index(title) for title in ("STAGE", "JOB", "STATE", "DEVICE-HOURS")]
    return [tuple(line[a:b].strip() for a, b in zip(starts, starts[1:])) for line in lines]


def wait_until_finished(run_dir: Path) -> dict[str, str]:
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while time.monotonic() < deadline:
        states = {stage: state for stage, _, state in status_rows(run_dir)}
        if all(state in FINISHED for state in states.values()):
            return states
        time.sleep(1)
    pytest.fail(f"jobs still unfinished after {POLL_TIMEOUT_S} s: {states}\n{job_outputs(run_dir)}")


def job_outputs(run_dir: Path) -> str:
    """Every job's output and error file, for the failure message."""
    files = sorted(run_dir.glob("*/slurm-*.*"))
    return "\n".join(f"--- {path}\n{path.read_text()[-4000:]}" for path in files) or "(no job output files)"


def test_tiny_pipeline_completes_with_artifacts_and_ledger_hours(slurm, tmp_path):
    run_dir = tmp_path / "run"
    jobs = launch(run_dir)
    states = wait_until_finished(run_dir)
    assert states == {"smoke": "COMPLETED"}, job_outputs(run_dir)
    stage_dir = run_dir / "smoke"
    for artifact in ("submission.sh", "config.yaml", "metrics.jsonl", f"slurm-{jobs['smoke']}.out"):
        assert (stage_dir / artifact).is_file(), artifact
    assert any((stage_dir / "checkpoints").iterdir()), job_outputs(run_dir)
    status = orlhf_launch("status", f"run_dir={run_dir}").stdout
    assert "(ledger)" in status, f"{status}\n{(run_dir / 'ledger.jsonl').read_text()}"


def test_failing_stage_fails_its_job_and_cancels_the_dependants(slurm, tmp_path):
    run_dir = tmp_path / "run"
    launch(run_dir, FAILING_CHAIN)
    states = wait_until_finished(run_dir)
    assert states == {"smoke": "COMPLETED", "mix": "FAILED", "task": "CANCELLED"}, job_outputs(run_dir)
    assert "README.md:1: expected" in "".join(p.read_text() for p in (run_dir / "mix").glob("slurm-*"))


def test_continuation_attempt_after_a_completed_stage_exits_at_once(slurm, tmp_path):
    """With max_attempts=2 the second job waits for the first (singleton) and, the stage
    being complete, succeeds without running it again."""
    run_dir = tmp_path / "run"
    jobs = launch(run_dir, "cluster.max_attempts=2", "cluster.time_limit=10")
    states = wait_until_finished(run_dir)
    assert states == {"smoke [1/2]": "COMPLETED", "smoke [2/2]": "COMPLETED"}, job_outputs(run_dir)
    second = run_dir / "smoke" / f"slurm-{jobs['smoke [2/2]']}.out"
    assert second.read_text().strip() == "smoke: already complete"


def test_a_job_that_can_never_start_shows_slurms_reason(slurm, tmp_path):
    """Was: PENDING alone, as for a job waiting its turn. More CPUs than a node has: sbatch
    queues it, the scheduler never starts it."""
    run_dir = tmp_path / "run"
    jobs = launch(run_dir, "cluster.cpus_per_task=999")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (rows := status_rows(run_dir))[0][2] == "PENDING":
            time.sleep(0.5)  # until the scheduler has looked at it
    finally:
        subprocess.run(["scancel", *jobs.values()], timeout=60)
    assert rows == [("smoke", jobs["smoke"], "PENDING (PartitionConfig)")]


@pytest.mark.parametrize(("variable", "refusal", "hint"), [
    ("SBATCH_RESERVATION", "Requested reservation is invalid", "check the reservation: SBATCH_RESERVATION"),
    ("SBATCH_CONSTRAINT", "Invalid feature specification", "check the node features: SBATCH_CONSTRAINT"),
])
def test_sbatch_reads_its_own_input_variables_from_the_launching_shell(slurm, tmp_path, monkeypatch, variable,
                                                                       refusal, hint):
    """Site settings without a key (docs/launcher.md): sbatch takes them from the environment;
    a value this cluster does not have is refused, and the hint names the variable."""
    monkeypatch.setenv(variable, "no_such_thing")
    proc = orlhf_launch("pipeline=smoke", "cluster=local_slurm", f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert f"{refusal}; {hint}" in proc.stderr and proc.stderr.endswith("nothing was submitted\n")
