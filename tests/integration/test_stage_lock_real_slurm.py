"""The stage lock asks the real squeue of scripts/local_slurm.sh whether the job of another
attempt of the same job name still runs: a lock held by a queued or running job is refused,
one of a cancelled job or of a job id Slurm does not know is taken over. (The unit tests in
tests/unit/test_stage_lock_slurm.py cover the rest with a scripted squeue.)"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict

import pytest

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.host import LOCK, Holder, acquire_stage_lock, release_stage_lock
from tests.integration.test_slurm_launch import slurm  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow
NAME = "orlhf.lock_test"


def hold(stage_dir, job_id: str) -> None:
    (stage_dir / LOCK).write_text(json.dumps(asdict(Holder("node7", 4242, 123, "2026-01-01T00:00:00", job_id, NAME))))


def listed(job: str) -> str:
    return subprocess.run(["squeue", "-h", f"--jobs={job}", "-o", "%T"], capture_output=True, text=True,
                          timeout=60).stdout.strip()


def test_the_real_squeue_decides_whether_another_attempt_has_ended(slurm, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SLURM_JOB_NAME", NAME)
    monkeypatch.setenv("SLURM_JOB_ID", "999999")  # this process: a later job of that name
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    job = subprocess.run(["sbatch", "--parsable", f"--job-name={NAME}", f"--output={tmp_path}/%j.out",
                          "--wrap=sleep 120"], capture_output=True, text=True, check=True,
                         timeout=60).stdout.strip().split(";")[0]
    try:
        hold(tmp_path, job)
        with pytest.raises(ConfigError, match=f"locked by job {job} \\({NAME}\\) on host node7, which squeue still "
                                              f"lists as (PENDING|CONFIGURING|RUNNING); wait for it to end or cancel "
                                              f"it: scancel {job}$"):
            acquire_stage_lock(tmp_path, "generate")
    finally:
        subprocess.run(["scancel", job], timeout=60)
    deadline = time.monotonic() + 60
    while listed(job) not in ("", "CANCELLED") and time.monotonic() < deadline:  # past COMPLETING
        time.sleep(0.5)
    assert listed(job) in ("", "CANCELLED")  # Slurm 22.05 lists no ended job; some versions do, for MinJobAge
    path, note = acquire_stage_lock(tmp_path, "generate")
    assert note == f"generate: took over the lock of job {job} ({NAME}) on node7: an earlier attempt of this job, ended"
    release_stage_lock(path)
    hold(tmp_path, "999998")  # never submitted: squeue exits 1, "Invalid job id specified"
    assert subprocess.run(["squeue", "-h", "--jobs=999998"], capture_output=True, timeout=60).returncode == 1
    assert acquire_stage_lock(tmp_path, "generate")[1].endswith("an earlier attempt of this job, ended")
    assert json.loads((tmp_path / LOCK).read_text())["job_id"] == "999999"
