"""The stage lock under Slurm (`offline_rlhf.host`): a lock written on another node is taken
over by a requeue of the same job (same id, higher SLURM_RESTART_COUNT), and by a later job of
the same name only once squeue no longer lists the holder's job.

squeue here is a scripted stand-in first on PATH (it logs its arguments and prints what a
test gives it): Slurm's own squeue needs a controller, which unit tests do not start; the
stand-in prints squeue's own output for `-h -o %T` (one state per line) and its exit 1 for a
job id it does not know."""

import json
import os
from dataclasses import asdict

import pytest

from offline_rlhf import host
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.host import LOCK, Holder, acquire_stage_lock, release_stage_lock

UNKNOWN = "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1"


class FakeSqueue:
    def __init__(self, folder, monkeypatch):
        self.bin, self.log = folder / "bin", folder / "squeue.log"
        self.bin.mkdir()
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")

    def answers(self, body: str) -> None:
        """`body` runs after the call is logged; $n is the number of calls so far."""
        script = self.bin / "squeue"
        script.write_text(f'#!/bin/bash\necho "$*" >> {self.log}\nn=$(wc -l < {self.log})\n{body}\n')
        script.chmod(0o755)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def squeue(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("SLURM_JOB_NAME", "run.generate")
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    fake = FakeSqueue(tmp_path, monkeypatch)
    fake.answers(UNKNOWN)
    return fake


@pytest.fixture
def stage_dir(tmp_path):
    (tmp_path / "generate").mkdir()
    return tmp_path / "generate"


def write_lock(stage_dir, job_id="100", job_name="run.generate", **fields):
    record = {**asdict(Holder("node7", 4242, 123, "2026-01-01T00:00:00", job_id, job_name)), **fields}
    (stage_dir / LOCK).write_text(json.dumps(record))


def lock_of(stage_dir) -> dict:
    return json.loads((stage_dir / LOCK).read_text())


def test_the_lock_records_the_restart_count(stage_dir, squeue, monkeypatch):
    path, _ = acquire_stage_lock(stage_dir, "generate")
    assert lock_of(stage_dir)["restart_count"] == 0  # unset: the job's first run
    release_stage_lock(path)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    acquire_stage_lock(stage_dir, "generate")
    assert (lock_of(stage_dir)["restart_count"], lock_of(stage_dir)["job_id"]) == (3, "101")


def test_a_requeued_job_takes_over_the_lock_of_its_run_on_another_node(stage_dir, squeue, monkeypatch):
    """Node failure or preemption with --requeue: the same job id starts again elsewhere with
    SLURM_RESTART_COUNT incremented, after Slurm saw the first run's processes gone."""
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(stage_dir, restart_count=0)
    path, note = acquire_stage_lock(stage_dir, "generate")
    assert note == "generate: took over the lock of job 100 (run.generate) on node7: its run before Slurm " \
                   "requeued it (restart 0), ended"
    assert (lock_of(stage_dir)["restart_count"], lock_of(stage_dir)["pid"]) == (1, os.getpid())
    assert squeue.calls() == []  # a requeue needs no squeue: Slurm restarted this very job
    release_stage_lock(path)
    (stage_dir / LOCK).write_text(json.dumps({k: v for k, v in asdict(Holder(
        "node7", 4242, 123, "2026-01-01T00:00:00", "100", "run.generate")).items() if k != "restart_count"}))
    assert acquire_stage_lock(stage_dir, "generate")[1].endswith("(restart 0), ended")  # a lock from before: 0


@pytest.mark.parametrize("held", [1, 2])
def test_the_same_job_not_restarted_since_is_refused(stage_dir, squeue, monkeypatch, held):
    """Restart count equal (the same run: another of its ranks, maybe) or higher: alive, maybe."""
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(stage_dir, restart_count=held)
    with pytest.raises(ConfigError, match=f"locked by pid 4242 on host node7 .*delete {stage_dir / LOCK}"):
        acquire_stage_lock(stage_dir, "generate")
    assert lock_of(stage_dir)["restart_count"] == held


def test_a_lock_of_an_earlier_attempt_that_squeue_no_longer_knows_is_taken_over(stage_dir, squeue):
    """orlhf launch's continuation: attempt 2 of job name run.generate starts (singleton)
    after attempt 1 ended at its time limit, killed holding the lock on another node."""
    write_lock(stage_dir)
    path, note = acquire_stage_lock(stage_dir, "generate")
    assert note == "generate: took over the lock of job 100 (run.generate) on node7: an earlier attempt of this " \
                   "job, ended"
    assert lock_of(stage_dir)["job_id"] == "101"
    assert squeue.calls() == ["-h --jobs=100 -o %T"]
    release_stage_lock(path)
    write_lock(stage_dir, job_id="101")  # the same job elsewhere, not requeued: a live run, maybe
    with pytest.raises(ConfigError, match="locked by pid 4242 on host node7"):
        acquire_stage_lock(stage_dir, "generate")
    write_lock(stage_dir, job_name="other.generate")  # another job name
    with pytest.raises(ConfigError, match="locked by pid 4242 on host node7"):
        acquire_stage_lock(stage_dir, "generate")


@pytest.mark.parametrize("listed", ["RUNNING", "PENDING", "SUSPENDED", "COMPLETING\\nRUNNING"])
def test_a_job_of_the_same_name_that_still_runs_keeps_its_lock(stage_dir, squeue, listed):
    """A job script resubmitted by hand, without singleton, while the first still runs."""
    squeue.answers(f"printf '{listed}\\n'")
    write_lock(stage_dir)
    with pytest.raises(ConfigError) as err:
        acquire_stage_lock(stage_dir, "generate")
    state = listed.split("\\n")[-1]
    assert str(err.value) == f"run_dir: generate in {stage_dir} is locked by job 100 (run.generate) on host node7, " \
                             f"which squeue still lists as {state}; wait for it to end or cancel it: scancel 100"
    assert lock_of(stage_dir)["pid"] == 4242


@pytest.mark.parametrize("answer", ["printf 'COMPLETED\\n'", "printf 'TIMEOUT\\n'", "printf 'CANCELLED\\n'", "true",
                                    "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1",
                                    "exec sleep 5"])
def test_an_ended_job_or_an_unanswered_squeue_leaves_the_takeover_to_singleton(stage_dir, squeue, monkeypatch,
                                                                                answer):
    """Ended (squeue lists a job for MinJobAge after its end), or squeue failing or hanging:
    the takeover rests on the launcher's --dependency=singleton, as before squeue was asked."""
    monkeypatch.setattr(host, "SQUEUE_TIMEOUT_S", 0.5)
    squeue.answers(answer)
    write_lock(stage_dir)
    assert acquire_stage_lock(stage_dir, "generate")[1].endswith("an earlier attempt of this job, ended")
    assert lock_of(stage_dir)["job_id"] == "101" and squeue.calls() == ["-h --jobs=100 -o %T"]


def test_without_squeue_the_takeover_is_left_to_singleton(stage_dir, squeue, monkeypatch, tmp_path):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    write_lock(stage_dir)
    assert acquire_stage_lock(stage_dir, "generate")[1].endswith("an earlier attempt of this job, ended")


def test_a_completing_job_is_waited_for_a_while(stage_dir, squeue, monkeypatch):
    """A singleton successor may start while the last attempt's processes still exit."""
    squeue.answers("[ \"$n\" -le 2 ] && echo COMPLETING; true")  # gone at the third call
    write_lock(stage_dir)
    assert acquire_stage_lock(stage_dir, "generate")[1].endswith("an earlier attempt of this job, ended")
    assert len(squeue.calls()) == 3
    monkeypatch.setattr(host, "COMPLETING_WAIT_S", 0)  # still completing when the wait is over: refused
    squeue.answers("echo COMPLETING")
    write_lock(stage_dir)
    with pytest.raises(ConfigError, match="which squeue still lists as COMPLETING; wait for it to end"):
        acquire_stage_lock(stage_dir, "generate")


@pytest.mark.parametrize("job_id", ["100; rm -rf ~", "-h", "100,101", "", "\u0661\u0662", 100])
def test_a_job_id_that_is_not_one_never_reaches_squeue(stage_dir, squeue, job_id):
    write_lock(stage_dir, job_id=job_id)
    with pytest.raises(ConfigError, match=f"{stage_dir / LOCK}: job_id .* is not a Slurm job id \\(expected digits, "
                                          "optionally _<array index>\\)"):
        acquire_stage_lock(stage_dir, "generate")
    assert squeue.calls() == []


def test_an_array_task_id_is_asked_of_squeue(stage_dir, squeue):
    write_lock(stage_dir, job_id="100_7")
    acquire_stage_lock(stage_dir, "generate")
    assert squeue.calls() == ["-h --jobs=100_7 -o %T"]


@pytest.mark.parametrize("count", [-1, "1", 1.5, True])
def test_a_restart_count_that_is_not_one_is_an_error(stage_dir, squeue, count):
    write_lock(stage_dir, restart_count=count)
    with pytest.raises(ConfigError, match=f"{stage_dir / LOCK}: restart_count .* is not a whole number >= 0"):
        acquire_stage_lock(stage_dir, "generate")


def test_a_malformed_slurm_restart_count_is_an_error(stage_dir, squeue, monkeypatch):
    for value in ("one", "-1"):
        monkeypatch.setenv("SLURM_RESTART_COUNT", value)
        with pytest.raises(ConfigError, match=f"SLURM_RESTART_COUNT: '{value}' is not a restart count; expected a "
                                              "whole number"):
            acquire_stage_lock(stage_dir, "generate")
    assert not (stage_dir / LOCK).exists()
