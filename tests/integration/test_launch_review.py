"""A relaunch over a chain Slurm still runs is refused, asked of the real local Slurm
(scripts/local_slurm.sh): its squeue lists the recorded job ids, a long-gone one included."""

from __future__ import annotations

import subprocess
import time

import pytest

from launcher.slurm import SubmittedStage, write_launch_record
from tests.integration.test_slurm_launch import orlhf_launch, slurm  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow


def sbatch(tmp_path, command: str) -> str:
    return subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/job-%j.out", f"--wrap={command}"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip().split(";")[0]


def finished_job(tmp_path) -> str:
    """A job that ran and left the queue (not a fixed id: on a fresh Slurm, 1 is the next one)."""
    job = sbatch(tmp_path, "true")
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h", "-o", "%i", f"--jobs={job}"], capture_output=True, text=True,
                         timeout=60).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} (true) still queued after 60 s"
        time.sleep(0.5)
    return job


def test_a_relaunch_over_a_running_chain_is_refused_before_anything_is_submitted(slurm, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gone = finished_job(tmp_path)
    job = sbatch(tmp_path, "sleep 120")
    try:
        write_launch_record(run_dir, "smoke", [SubmittedStage("smoke", "/x.sh", [gone, job])])
        proc = orlhf_launch("pipeline=smoke", "cluster=local_slurm", f"run_dir={run_dir}")
    finally:
        subprocess.run(["scancel", job], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"orlhf launch: error: run_dir: job(s) {job} of the launch recorded in ")
    assert proc.stderr.endswith(f"or cancel them: scancel {job}\n")
    assert not (run_dir / "smoke").exists()  # nothing written, nothing submitted
