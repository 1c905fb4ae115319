"""Rendered job scripts run by bash without Slurm: `srun` is a stand-in that drops its options
and runs the rest, `python` a bash script playing the stage. What Slurm itself does (het
groups, the timed warning to every step's processes) is in
tests/integration/test_slurm_ppo_steps.py; this covers the scripts' own logic everywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launcher import render
from launcher.plan import StagePlan
from launcher.ppo import Module, placement_overrides, ppo_components
from launcher.render import render_script
from launcher.schema import ClusterConfig, PPOComponents

FAKE_SRUN = """#!/bin/bash
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
"""

# The actor: `mode` says what it does; a service serves until told to shut down (the file
# `shutdown`) or fails at once when `fail_<name>` exists.
FAKE_PYTHON = r"""#!/bin/bash
dir=%(dir)s
name=actor
for arg; do case $arg in serve=*) name=${arg#serve=};; esac; done
echo "$name: started" >> "$dir/events"
if [ "$name" != actor ]; then
  [ ! -e "$dir/fail_$name" ] || exit 3
  while [ ! -e "$dir/shutdown" ]; do sleep 0.1; done
  echo "$name: row" >> "$dir/events"
  exit 0
fi
case $(cat "$dir/mode") in
  nothing) exit 0 ;;
  done) sleep 0.5; touch "$dir/shutdown"; exit 0 ;;
  crash) sleep 0.5; touch "$dir/shutdown"; exit 5 ;;
  run) while :; do sleep 0.1; done ;;
esac
"""


def bin_dir(tmp_path: Path, mode: str = "run") -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "srun").write_text(FAKE_SRUN)
    (folder / "python").write_text(FAKE_PYTHON % {"dir": tmp_path})
    for program in folder.iterdir():
        program.chmod(0o755)
    (tmp_path / "mode").write_text(mode)
    return folder


def ppo_script(tmp_path: Path, folder: Path) -> Path:
    layout = PPOComponents(reward_with_critic=True, reference_with_actor=True)
    stage_dir = tmp_path / "run" / "ppo"
    plan = StagePlan(name="ppo", stage="ppo", args=(*placement_overrides(layout), f"run_dir={stage_dir.parent}"),
                     nodes=1, procs_per_node=1, stage_dir=stage_dir, config_yaml="", time_limit=None,
                     components=ppo_components("pipeline.stages[0]", layout, Module("actor", 1), 1,
                                               {"critic": {"nproc": 1}, "reward": {"nproc": 1}}))
    script = tmp_path / "submission.sh"
    script.write_text(render_script(plan, ClusterConfig(kind="slurm"), str(folder / "python")))
    return script


def run(script: Path, folder: Path, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of the script; what it leaves running (steps Slurm would
    end with the job) is killed after. Its output goes to files: a step left running would
    hold a pipe open."""
    started = time.monotonic()
    err = script.with_suffix(".err")
    with open(err, "w") as handle:
        proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.DEVNULL, stderr=handle,
                                start_new_session=True,
                                env={**(env or os.environ), "PATH": f"{folder}:{os.environ['PATH']}"})
        try:
            code = proc.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):  # nothing left
                os.killpg(proc.pid, signal.SIGKILL)
    return code, err.read_text(), time.monotonic() - started


def events(tmp_path: Path) -> list[str]:
    return sorted((tmp_path / "events").read_text().splitlines())


@pytest.fixture
def short_grace(monkeypatch):
    monkeypatch.setattr(render, "SERVICE_GRACE_S", 2)


def test_an_actor_with_nothing_to_do_ends_the_job_with_0_after_the_grace(tmp_path, short_grace):
    """Was: `wait -n` for every step, so services never told to stop kept the job to its limit."""
    folder = bin_dir(tmp_path, "nothing")
    code, stderr, took = run(ppo_script(tmp_path, folder), folder)
    assert code == 0, stderr
    assert 2 <= took < 10
    assert "still running 2 s after the actor's ended; ending them" in stderr


def test_services_told_to_stop_end_the_job_at_once_with_the_actors_0(tmp_path, short_grace):
    folder = bin_dir(tmp_path, "done")
    code, stderr, took = run(ppo_script(tmp_path, folder), folder)
    assert (code, stderr) == (0, "")
    assert took < 2.5 and events(tmp_path) == [
        "actor: started", "critic: row", "critic: started", "reward: row", "reward: started"]


def test_a_failing_actor_fails_the_job_once_its_services_have_ended(tmp_path, short_grace):
    folder = bin_dir(tmp_path, "crash")
    code, stderr, _ = run(ppo_script(tmp_path, folder), folder)
    assert code == 5
    assert stderr == "orlhf launch: a PPO job step failed (the actor, exit code 5); ending the job\n"
    assert "critic: row" in events(tmp_path) and "reward: row" in events(tmp_path)


def test_a_service_failing_while_the_actor_runs_ends_the_job_with_its_status(tmp_path, short_grace):
    (tmp_path / "fail_reward").touch()
    folder = bin_dir(tmp_path, "run")
    code, stderr, _ = run(ppo_script(tmp_path, folder), folder)
    assert code == 3
    assert stderr == "orlhf launch: a PPO job step failed (the reward service, exit code 3)\n"


def test_the_submitting_shells_rendezvous_variables_are_unset_in_the_job(tmp_path):
    folder = bin_dir(tmp_path)
    (folder / "python").write_text(f"#!/bin/bash\nenv > {tmp_path / 'env.txt'}\n")
    plan = StagePlan(name="mix", stage="mix", args=(), nodes=1, procs_per_node=1, stage_dir=tmp_path / "mix",
                     config_yaml="", time_limit=None)
    script = tmp_path / "submission.sh"
    script.write_text(render_script(plan, ClusterConfig(kind="slurm", env={"KEPT": "1"}), str(folder / "python")))
    leaked = {"MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "29500", "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
              "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1", "ROLE_RANK": "1", "TORCHELASTIC_RUN_ID": "other"}
    code, stderr, _ = run(script, folder, {**os.environ, **leaked})
    assert code == 0, stderr
    seen = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines() if "=" in line)
    assert not set(leaked) & set(seen) and seen["KEPT"] == "1"
