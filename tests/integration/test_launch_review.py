"""A relaunch over a chain Slurm still runs is refused, asked of the real local Slurm
(scripts/local_slurm.sh): its squeue lists the recorded job ids, a long-gone one included."""

from __future__ import annotations

import subprocess

import pytest

from launcher.slurm import SubmittedStage, write_launch_record
from tests.integration.test_slurm_launch import orlhf_launch, slurm  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow


def test_a_relaunch_over_a_running_chain_is_refused_before_anything_is_submitted(slurm, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/sleep-%j.out", "--wrap=sleep 120"],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip().split(";")[0]
    try:
        write_launch_record(run_dir, "smoke", [SubmittedStage("smoke", "/x.sh", ["1", job])])  # 1: long gone
        proc = orlhf_launch("pipeline=smoke", "cluster=local_slurm", f"run_dir={run_dir}")
    finally:
        subprocess.run(["scancel", job], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"orlhf launch: error: run_dir: job(s) {job} of the launch recorded in ")
    assert proc.stderr.endswith(f"or cancel them: scancel {job}\n")
    assert not (run_dir / "smoke").exists()  # nothing written, nothing submitted
