"""Submission order, dependency flags and the launch record, with sbatch faked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from launcher import slurm
from launcher.plan import StagePlan
from launcher.schema import LaunchError


class FakeSlurm:
    """Records every command; sbatch answers job ids 100, 101, ... (or fails on `fail_at`)."""

    def __init__(self, fail_at: int | None = None):
        self.commands: list[list[str]] = []
        self.fail_at = fail_at
        self.error = "sbatch: error: invalid partition specified: gpu"

    def __call__(self, command, timeout_s=60):
        self.commands.append(command)
        submitted = sum(c[0] == "sbatch" for c in self.commands)
        if command[0] == "sbatch" and submitted == self.fail_at:
            return subprocess.CompletedProcess(command, 1, "", self.error + "\n")
        return subprocess.CompletedProcess(command, 0, f"{99 + submitted};cluster\n", "")


def plans(tmp_path: Path, *names: str) -> list[StagePlan]:
    return [StagePlan(name=n, stage=n, args=(), nodes=1, procs_per_node=1, stage_dir=tmp_path / n,
                      config_yaml="", time_limit=None) for n in names]


def scripts(tmp_path: Path, *names: str) -> list[Path]:
    return [tmp_path / n / "submission.sh" for n in names]


def test_stages_are_chained_with_afterok_and_killed_on_invalid_dependency(tmp_path, monkeypatch):
    fake = FakeSlurm()
    monkeypatch.setattr(slurm, "_run", fake)
    submitted = slurm.submit_chain(plans(tmp_path, "sft", "rm"), scripts(tmp_path, "sft", "rm"), [[], [0]],
                                   max_attempts=1)
    assert [(s.name, s.job_ids) for s in submitted] == [("sft", ["100"]), ("rm", ["101"])]
    assert fake.commands == [
        ["sbatch", "--parsable", str(tmp_path / "sft/submission.sh")],
        ["sbatch", "--parsable", "--dependency=afterok:100", "--kill-on-invalid-dep=yes",
         str(tmp_path / "rm/submission.sh")],
    ]


def test_continuation_attempts_wait_on_singleton_and_the_next_stage_on_the_last_attempt(tmp_path, monkeypatch):
    fake = FakeSlurm()
    monkeypatch.setattr(slurm, "_run", fake)
    submitted = slurm.submit_chain(plans(tmp_path, "sft", "rm"), scripts(tmp_path, "sft", "rm"), [[], [0]],
                                   max_attempts=2)
    assert [s.job_ids for s in submitted] == [["100", "101"], ["102", "103"]]
    dependencies = [c[2] if len(c) > 3 else None for c in fake.commands]
    assert dependencies == [None, "--dependency=singleton",
                            "--dependency=afterok:101", "--dependency=afterok:101,singleton"]


def test_a_failed_submission_cancels_the_jobs_already_submitted(tmp_path, monkeypatch):
    fake = FakeSlurm(fail_at=3)
    monkeypatch.setattr(slurm, "_run", fake)
    names = ("sft", "rm", "generate")
    with pytest.raises(LaunchError, match=r"^stage generate: sbatch: sbatch: error: invalid partition specified: gpu; "
                       r"check cluster.partition: use a partition of this cluster \(sinfo -s\); "
                       r"cancelled job\(s\) 100 101$"):
        slurm.submit_chain(plans(tmp_path, *names), scripts(tmp_path, *names), [[], [0], [1]], max_attempts=1)
    assert fake.commands[-1] == ["scancel", "100", "101"]


def test_launch_record_round_trips_and_leaves_no_temporary_file(tmp_path):
    stages = [slurm.SubmittedStage("demo", "/r/demo/submission.sh", ["7"])]
    path = slurm.write_launch_record(tmp_path, "tiny_demo", stages)
    assert slurm.read_launch_record(tmp_path) == stages
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_missing_sbatch_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LaunchError, match="^cluster.kind: sbatch not found"):
        slurm.sbatch("sft", Path("/x.sh"), [])


def test_a_submission_the_controller_never_got_points_at_the_controller(tmp_path, monkeypatch):
    """Was: "cluster.partition or cluster.account may be the cause" for a controller that is down."""
    fake = FakeSlurm(fail_at=1)
    fake.error = "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)"
    monkeypatch.setattr(slurm, "_run", fake)
    with pytest.raises(LaunchError, match=r"Unable to contact slurm controller \(connect failure\); is slurmctld "
                                          r"reachable\? \(scontrol ping\); nothing was submitted$"):
        slurm.submit_chain(plans(tmp_path, "sft"), scripts(tmp_path, "sft"), [[]], max_attempts=1)


@pytest.mark.parametrize(("error", "hint"), [
    # What this Slurm (22.05) prints; was "cluster.partition or cluster.account may be the cause" for each.
    ("sbatch: error: Invalid --mem specification", "check cluster.mem: use Slurm's syntax"),
    ("sbatch: error: Memory specification can not be satisfied\nsbatch: error: Batch job submission failed: "
     "Requested node configuration is not available", "check cluster.mem: "),
    ("sbatch: error: invalid partition specified: nope\nsbatch: error: Batch job submission failed: Invalid "
     "partition name specified", "check cluster.partition: use a partition of this cluster (sinfo -s)"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     "check cluster.account (with cluster.partition)"),
    ("sbatch: error: Invalid --time specification", "check cluster.time_limit or the stage's time_limit"),
    ("sbatch: error: Invalid generic resource (gres) specification", "check cluster.gpus_per_node"),
    ("sbatch: error: Batch job submission failed: Invalid qos specification", "check the QOS: SBATCH_QOS"),
    ("sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, user's "
     "size and/or time limits)", "check the QOS: SBATCH_QOS"),
    ("sbatch: error: Batch job submission failed: Requested reservation is invalid",
     "check the reservation: SBATCH_RESERVATION"),
    ("sbatch: error: Batch job submission failed: Invalid feature specification",
     "check the node features: SBATCH_CONSTRAINT"),
    ("sbatch: error: Batch job submission failed: Requested node configuration is not available",
     "check the resources asked for per node"),
    ("sbatch: error: Batch job submission failed: something new", "check the stage's #SBATCH lines"),
])
def test_a_refused_submission_names_the_setting_sbatch_refused(tmp_path, monkeypatch, error, hint):
    fake = FakeSlurm(fail_at=1)
    fake.error = error
    monkeypatch.setattr(slurm, "_run", fake)
    with pytest.raises(LaunchError) as info:
        slurm.submit_chain(plans(tmp_path, "sft"), scripts(tmp_path, "sft"), [[]], max_attempts=1)
    assert str(info.value).startswith(f"stage sft: sbatch: {error.splitlines()[0]}; {hint}")
