"""Slurm's warning signal, delivered for real (scripts/local_slurm.sh): the rendered script's
step runs torchrun with two SFT ranks; the signal Slurm sends the step reaches every process
of it, torchrun survives it (the step ignores SIGUSR1) and both ranks save and stop.

`scancel --signal=USR1` stands in for `#SBATCH --signal=USR1@N`: both have slurmd signal
every process of the job's steps (not the batch shell); the timed one would keep the test
waiting for the controller's minute-grained timer.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

from launcher.plan import StagePlan
from launcher.render import render_script
from launcher.schema import ClusterConfig
from offline_rlhf.checkpoint import latest_checkpoint, read_meta
from tests.fixtures import REPO_ROOT
from tests.integration.test_sft_stage import sft_args
from tests.integration.test_slurm_launch import slurm  # noqa: F401  (the fixture)

DEADLINE_S = 180


def job_state(job: str) -> tuple[str, str]:
    fields = dict(re.findall(r"(\S+?)=(\S*)", subprocess.run(["scontrol", "show", "job", "-o", job],
                                                             capture_output=True, text=True).stdout))
    return fields.get("JobState", ""), fields.get("ExitCode", "")


def test_slurms_warning_makes_both_torchrun_ranks_save_and_stop(slurm, tmp_path, public_tokenizer):  # noqa: F811
    run_dir = tmp_path / "run"
    stage_dir = run_dir / "sft"
    stage_dir.mkdir(parents=True)
    _, *args = sft_args(run_dir, public_tokenizer, "train.max_steps=200", "train.save_every=1000",
                        "train.val_every=0")
    plan = StagePlan(name="sft", stage="sft", args=tuple(args), nodes=1, procs_per_node=2, stage_dir=stage_dir,
                     config_yaml="", time_limit="10")
    cluster = ClusterConfig(kind="slurm", partition="debug", signal_lead_s=120, env={"OMP_NUM_THREADS": "1"})
    script = stage_dir / "submission.sh"
    script.write_text(render_script(plan, cluster, sys.executable))
    assert "#SBATCH --signal=USR1@120\n" in script.read_text()
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT).stdout.strip().split(";")[0]
    metrics, deadline = stage_dir / "metrics.jsonl", time.monotonic() + DEADLINE_S
    try:
        while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("train/loss") >= 2):
            time.sleep(0.1)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        while time.monotonic() < deadline and job_state(job)[0] in ("PENDING", "RUNNING", "COMPLETING"):
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job])  # a job the signal did not end stops here, not at its limit
    output = (stage_dir / f"slurm-{job}.out").read_text() + (stage_dir / f"slurm-{job}.err").read_text()
    reached = re.search(r"after saving step (\d+) of 200 to", output)
    assert reached, output[-4000:]
    assert job_state(job) == ("FAILED", "1:0"), output[-4000:]  # torchrun's status for its workers' 75
    # Both ranks saved and exited 75; one may still have been tearing down when torchrun, seeing
    # the other gone, sent it SIGTERM (-15).
    exits = re.findall(r"exitcode\s*: (-?\d+)", output)
    assert "75" in exits and set(exits) <= {"75", "-15"}, output[-4000:]
    ckpt = latest_checkpoint(stage_dir / "checkpoints")
    assert ckpt.name == f"step_{int(reached.group(1)):08d}" and read_meta(ckpt).world_size == 2
