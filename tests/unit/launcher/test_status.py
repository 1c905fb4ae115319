"""`orlhf launch status`: job states from Slurm's answers, device-hours from the ledger."""

from __future__ import annotations

import json
import subprocess

from launcher import slurm, status


def answer(stdout: str = "", code: int = 0):
    return lambda command: subprocess.CompletedProcess(command, code, stdout, "")


def test_scontrol_answer_gives_state_runtime_and_gpus(monkeypatch):
    monkeypatch.setattr(slurm, "_run", answer(
        "JobId=42 JobName=r.sft JobState=COMPLETED Reason=None RunTime=01:30:00 NumNodes=4 "
        "AllocTRES=cpu=256,mem=1T,node=4,billing=256,gres/gpu=32\n"))
    assert slurm.query_job("42") == slurm.JobInfo("COMPLETED", 5400, 32)


def test_a_pending_job_carries_slurms_reason_and_the_table_shows_it(tmp_path, monkeypatch, capsys):
    """Was: PENDING alone, for a job that never starts (PartitionConfig) as for one that waits its turn."""
    answers = {"5": "JobId=5 JobName=r.sft JobState=PENDING Reason=PartitionConfig Dependency=(null) RunTime=00:00:00",
               "6": "JobId=6 JobName=r.rm JobState=PENDING Reason=Dependency Dependency=afterok:5(unfulfilled)",
               "7": "JobId=7 JobName=r.eval JobState=RUNNING Reason=None RunTime=00:01:00"}
    monkeypatch.setattr(slurm, "_run", lambda command: subprocess.CompletedProcess(command, 0, answers[command[-1]],
                                                                                    ""))
    assert slurm.query_job("5") == slurm.JobInfo("PENDING", 0, 0, "PartitionConfig")
    assert slurm.query_job("7") == slurm.JobInfo("RUNNING", 60, 0)
    slurm.write_launch_record(tmp_path, "p", [slurm.SubmittedStage(name, "s", [job])
                                              for name, job in (("sft", "5"), ("rm", "6"), ("eval", "7"))])
    status.show_status(tmp_path)
    assert capsys.readouterr().out.splitlines() == [
        "STAGE  JOB  STATE                      DEVICE-HOURS",
        "sft    5    PENDING (PartitionConfig)  -",
        "rm     6    PENDING (Dependency)       -",
        "eval   7    RUNNING                    -",
    ]


def test_jobcomp_log_is_the_last_resort(monkeypatch):
    """`scontrol` forgot the job, `sacct` has no accounting storage, `sacct -c` knows it."""
    def run(command):
        if command[:2] == ["sacct", "-c"]:
            return subprocess.CompletedProcess(command, 0, "CANCELLED by 0|1-00:00:05\n", "")
        return subprocess.CompletedProcess(command, 1, "", "invalid job id / accounting disabled")
    monkeypatch.setattr(slurm, "_run", run)
    assert slurm.query_job("9") == slurm.JobInfo("CANCELLED", 86405, 0)


def test_device_hours_sum_ledger_rows_then_fall_back_to_slurm(tmp_path):
    rows = [{"stage": "sft", "job_id": "42", "device_hours": 1.5}, {"stage": "sft", "job_id": 42, "device_hours": 0.5},
            {"stage": "demo", "job_id": None, "device_hours": 9.0}]
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    ledger = status.ledger_hours(status.module_hours(tmp_path))
    assert ledger == {"42": 2.0}
    assert status.device_hours("42", None, ledger) == "2.0000 (ledger)"
    assert status.device_hours("43", slurm.JobInfo("TIMEOUT", 3600, 8), ledger) == "8.0000 (slurm)"
    assert status.device_hours("44", slurm.JobInfo("RUNNING", 60, 8), ledger) == "-"
    assert status.device_hours("45", slurm.JobInfo("COMPLETED", 60, 0), ledger) == "-"


def test_status_table_has_one_row_per_job(tmp_path, monkeypatch, capsys):
    slurm.write_launch_record(tmp_path, "p", [slurm.SubmittedStage("sft", "s", ["5", "6"]),
                                              slurm.SubmittedStage("rm", "s", ["7"])])
    states = {"5": "TIMEOUT", "6": "RUNNING", "7": "PENDING"}
    monkeypatch.setattr(status, "query_job", lambda job: slurm.JobInfo(states[job], 10, 0))
    assert status.show_status(tmp_path) == 0
    assert capsys.readouterr().out.splitlines() == [
        "STAGE      JOB  STATE    DEVICE-HOURS",
        "sft [1/2]  5    TIMEOUT  -",
        "sft [2/2]  6    RUNNING  -",
        "rm         7    PENDING  -",
    ]


def test_a_job_with_several_modules_lists_each_modules_hours(tmp_path, monkeypatch, capsys):
    """The PPO heterogeneous job: every module's rows carry the job id; the job's hours are
    their sum, and each module gets a row of its own under it."""
    rows = [{"stage": "ppo_critic", "job_id": "8", "device_hours": 0.5},
            {"stage": "ppo_actor", "job_id": "8", "device_hours": 2.0},
            {"stage": "ppo_actor", "job_id": "8", "device_hours": 1.0},
            {"stage": "sft", "job_id": "7", "device_hours": 4.0}]
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    slurm.write_launch_record(tmp_path, "p", [slurm.SubmittedStage("sft", "s", ["7"]),
                                              slurm.SubmittedStage("ppo", "s", ["8"])])
    monkeypatch.setattr(status, "query_job", lambda job: slurm.JobInfo("COMPLETED", 10, 0))
    assert status.show_status(tmp_path) == 0
    assert capsys.readouterr().out.splitlines() == [
        "STAGE         JOB  STATE      DEVICE-HOURS",
        "sft           7    COMPLETED  4.0000 (ledger)",
        "ppo           8    COMPLETED  3.5000 (ledger)",
        "  ppo_actor   8    COMPLETED  3.0000 (ledger)",
        "  ppo_critic  8    COMPLETED  0.5000 (ledger)",
    ]
