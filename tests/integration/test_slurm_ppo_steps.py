"""The PPO heterogeneous job's script (launcher.render.render_hetjob) and a plain stage's, run by
the real Slurm of scripts/local_slurm.sh with a stand-in for the interpreter: a bash script
that plays the actor and the services (serve=NAME), so each case takes seconds, not a PPO run.

- an actor that ends with 0 without telling its services to stop (it found nothing to do)
  ends the job COMPLETED after the services' grace, not at the time limit;
- Slurm's warning ahead of the time limit reaches the actor, which then tells its services
  to shut down (they record their rows); the services and every step's top process ignore
  the warning itself;
- a service step that fails while the actor runs ends the job with its status;
- the services append to their service.log (a later job keeps an earlier job's log);
- the submitting shell's rendezvous and torchrun variables do not reach a stage.

`scancel --signal=USR1` stands in for `#SBATCH --signal=USR1@N` (both have slurmd signal every
process of the job's steps, not the batch shell), as in test_slurm_stop_signal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from launcher import render
from launcher.plan import StagePlan
from launcher.ppo import Module, placement_overrides, ppo_components
from launcher.render import render_script
from launcher.schema import ClusterConfig, PPOComponents
from launcher.slurm import write_stage_files
from tests.integration.test_slurm_launch import slurm  # noqa: F401  (the fixture)

DEADLINE_S = 90  # well under the jobs' 3-minute limit, which the old script waited for
GRACE_S = 4

# Stands in for `python -m offline_rlhf.cli ppo ... [serve=NAME]` (no torch: it starts in
# milliseconds). A service serves until the actor tells it to shut down (the file `shutdown`),
# then records its row; the actor does what the file `mode` says: end at once (it found
# nothing to do), or run until the warning, which it takes as ppo_baseline.stage does (a
# Python handler replaces the ignore the step starts with), then tell the services and exit
# 75. Each process logs what it starts with and the signals it gets to `events`.
FAKE_PYTHON = """#!%(python)s
import os, signal, sys, time
from pathlib import Path

folder = Path(%(dir)r)
name = next((arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("serve=")), "actor")


def log(what):
    with open(folder / "events", "a") as handle:
        handle.write(f"{name}: {what}\\n")


def stop(signum, frame):
    log(signal.Signals(signum).name)
    sys.exit(143)


log(f"started, SIGUSR1 {getattr(signal.getsignal(signal.SIGUSR1), 'name', 'handled')}")
signal.signal(signal.SIGTERM, stop)
if name != "actor":
    print(f"{name} serving in job {os.environ['SLURM_JOB_ID']}", flush=True)
    if (folder / f"fail_{name}").exists():
        sys.exit(3)
    while not (folder / "shutdown").exists():
        time.sleep(0.1)
    log("row")
    sys.exit(0)
if (folder / "mode").read_text() == "nothing":
    sys.exit(0)
warned = []
signal.signal(signal.SIGUSR1, lambda signum, frame: warned.append(signum))
(folder / "actor_ready").touch()
while not warned:
    time.sleep(0.1)
log("SIGUSR1")
(folder / "shutdown").touch()
time.sleep(0.3)
sys.exit(75)
"""


def fake_python(tmp_path: Path, mode: str) -> Path:
    (tmp_path / "mode").write_text(mode)
    program = tmp_path / "fake_python"
    program.write_text(FAKE_PYTHON % {"python": sys.executable, "dir": str(tmp_path)})
    program.chmod(0o755)
    return program


def ppo_job(tmp_path: Path, mode: str, monkeypatch) -> tuple[str, Path]:
    """Submit the two-node layout (actor; critic and reward sharing a component) with a
    3-minute limit and the warning 60 s ahead; returns the job id and the stage folder."""
    monkeypatch.setattr(render, "SERVICE_GRACE_S", GRACE_S)
    layout = PPOComponents(reward_with_critic=True, reference_with_actor=True)
    stage_dir = tmp_path / "run" / "ppo"
    plan = StagePlan(name="ppo", stage="ppo", args=(*placement_overrides(layout), f"run_dir={stage_dir.parent}"),
                     nodes=1, procs_per_node=1, stage_dir=stage_dir, config_yaml="", time_limit="3",
                     components=ppo_components("pipeline.stages[0]", layout, Module("actor", 1), 1,
                                               {"critic": {"nproc": 1}, "reward": {"nproc": 1}}))
    cluster = ClusterConfig(kind="slurm", partition="debug", signal_lead_s=60)
    script = write_stage_files(plan, cluster, str(fake_python(tmp_path, mode)))
    (stage_dir / "critic" / "service.log").write_text("an earlier job's log\n")
    return submit(script), stage_dir


def submit(script: Path, env: dict[str, str] | None = None) -> str:
    return subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True,
                          timeout=60, env=env).stdout.strip().split(";")[0]


def job_state(job: str) -> tuple[str, str]:
    """(JobState, ExitCode) of the job (a heterogeneous job's leader: the first line)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(\S+?)=(\S*)", out.splitlines()[0] if out.strip() else ""))
    return fields.get("JobState", ""), fields.get("ExitCode", "")


def wait_ended(job: str, deadline: float) -> tuple[str, str]:
    try:
        while time.monotonic() < deadline:
            state = job_state(job)
            if state[0] not in ("", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return state
            time.sleep(0.5)
        return job_state(job)
    finally:
        subprocess.run(["scancel", job], timeout=60)  # a job still running here would run to its limit


def wait_for(path: Path, lines: list[str], deadline: float) -> None:
    while time.monotonic() < deadline and not all(line in read(path) for line in lines):
        time.sleep(0.2)


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def outputs(stage_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(stage_dir.glob("slurm-*")))


def test_an_actor_with_nothing_to_do_ends_the_job_after_the_services_grace(slurm, tmp_path, monkeypatch):  # noqa: F811
    """Was: the services, never told to stop, ran on and the job hit its time limit (TIMEOUT,
    the chain behind it cancelled, DONE never written by that attempt)."""
    job, stage_dir = ppo_job(tmp_path, "nothing", monkeypatch)
    submitted = time.monotonic()
    state = wait_ended(job, submitted + DEADLINE_S)
    assert state == ("COMPLETED", "0:0"), outputs(stage_dir) + read(tmp_path / "events")
    assert time.monotonic() - submitted < 60
    assert f"still running {GRACE_S} s after the actor's ended; ending them" in outputs(stage_dir)
    log = (stage_dir / "critic" / "service.log").read_text()
    assert log.startswith("an earlier job's log\n") and f"critic serving in job {job}" in log  # appended


def test_the_warning_reaches_the_actor_which_stops_its_services_and_they_record_rows(slurm, tmp_path,  # noqa: F811
                                                                                      monkeypatch):
    """Was: no warning for the PPO job; at the limit every step was killed at once."""
    job, stage_dir = ppo_job(tmp_path, "run", monkeypatch)
    deadline = time.monotonic() + DEADLINE_S
    events = tmp_path / "events"
    wait_for(events, ["critic: started", "reward: started"], deadline)
    while time.monotonic() < deadline and not (tmp_path / "actor_ready").exists():
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=60)
    state = wait_ended(job, deadline)
    assert "#SBATCH --signal=USR1@60\n" in (stage_dir / "submission.sh").read_text()
    assert state == ("FAILED", "75:0"), outputs(stage_dir) + read(events)  # the actor's status: saved, resumable
    assert sorted(read(events).splitlines()) == [
        "actor: SIGUSR1", "actor: started, SIGUSR1 SIG_IGN", "critic: row", "critic: started, SIGUSR1 SIG_IGN",
        "reward: row", "reward: started, SIGUSR1 SIG_IGN"]
    assert "the actor, exit code 75" in outputs(stage_dir)


def test_a_failing_service_ends_the_job_with_its_status(slurm, tmp_path, monkeypatch):  # noqa: F811
    (tmp_path / "fail_reward").touch()
    job, stage_dir = ppo_job(tmp_path, "run", monkeypatch)
    state = wait_ended(job, time.monotonic() + DEADLINE_S)
    assert state == ("FAILED", "3:0"), outputs(stage_dir) + read(tmp_path / "events")
    assert "orlhf launch: a PPO job step failed (the reward service, exit code 3)\n" in outputs(stage_dir)


def test_the_submitting_shells_rendezvous_variables_do_not_reach_the_stage(slurm, tmp_path):  # noqa: F811
    """Was: sbatch exported them into the job, and a stage launched from inside a torchrun
    worker or another job rendezvoused with that one's host (and hung)."""
    dump = tmp_path / "env.txt"
    program = tmp_path / "fake_python"
    program.write_text(f"#!/bin/bash\nenv > {dump}\n")
    program.chmod(0o755)
    stage_dir = tmp_path / "run" / "mix"
    stage_dir.mkdir(parents=True)
    plan = StagePlan(name="mix", stage="mix", args=(f"run_dir={stage_dir.parent}",), nodes=1, procs_per_node=1,
                     stage_dir=stage_dir, config_yaml="", time_limit="3")
    script = stage_dir / "submission.sh"
    script.write_text(render_script(plan, ClusterConfig(kind="slurm", partition="debug", env={"KEPT": "yes"}),
                                    str(program)))
    leaked = {"MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "29500", "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
              "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "other",
              "TORCHELASTIC_RESTART_COUNT": "0"}
    job = submit(script, env={**os.environ, **leaked})
    assert wait_ended(job, time.monotonic() + DEADLINE_S) == ("COMPLETED", "0:0"), outputs(stage_dir)
    seen = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert not set(leaked) & set(seen), {name: seen[name] for name in set(leaked) & set(seen)}
    assert seen["KEPT"] == "yes" and seen["SLURM_JOB_ID"] == job
