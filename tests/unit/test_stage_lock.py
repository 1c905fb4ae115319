"""The per-stage lock (`offline_rlhf.host`): a live holder refuses a second run, a holder
killed on this host is taken over, a holder on another host is left alone (outside Slurm; under
Slurm see test_stage_lock_slurm.py), and the process start time the ledger's clock uses is the
process's creation."""

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.host import LOCK, Holder, acquire_stage_lock, release_stage_lock, start_ticks


def write_lock(stage_dir, holder: Holder):
    (stage_dir / LOCK).write_text(json.dumps(asdict(holder)))


@pytest.fixture
def sleeper():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_lock_records_its_holder_and_is_released(tmp_path):
    path, note = acquire_stage_lock(tmp_path, "mix")
    held = json.loads(path.read_text())
    assert note is None and path == tmp_path / LOCK
    assert (held["host"], held["pid"], held["start_ticks"]) == (socket.gethostname(), os.getpid(), start_ticks("self"))
    release_stage_lock(path)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_a_live_holder_refuses_a_second_run_in_one_line(tmp_path, sleeper):
    write_lock(tmp_path, Holder(socket.gethostname(), sleeper.pid, start_ticks(sleeper.pid), "2026-01-01T00:00:00"))
    with pytest.raises(ConfigError, match=f"mix in {tmp_path} is already running as pid {sleeper.pid}") as err:
        acquire_stage_lock(tmp_path, "mix")
    assert "\n" not in str(err.value)
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == sleeper.pid


def test_a_dead_holder_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(tmp_path, Holder(socket.gethostname(), gone.pid, 123, "2026-01-01T00:00:00"))
    path, note = acquire_stage_lock(tmp_path, "label")
    assert f"took over the lock of pid {gone.pid}" in note
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path):
    write_lock(tmp_path, Holder(socket.gethostname(), os.getpid(), start_ticks("self") - 1, "2026-01-01T00:00:00"))
    path, note = acquire_stage_lock(tmp_path, "eval")
    assert note is not None and json.loads(path.read_text())["start_ticks"] == start_ticks("self")


def test_a_lock_from_another_host_is_never_broken(tmp_path):
    write_lock(tmp_path, Holder("elsewhere", 1, 1, "2026-01-01T00:00:00"))
    with pytest.raises(ConfigError, match=f"pid 1 on host elsewhere .*delete {tmp_path / LOCK}"):
        acquire_stage_lock(tmp_path, "sft")
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "elsewhere"


def test_process_start_time_is_the_creation_of_the_process():
    before = time.time()
    child = subprocess.run([sys.executable, "-c", "import time; time.sleep(1.5); from offline_rlhf.host import "
                            "process_started_at; print(process_started_at())"], capture_output=True, text=True)
    started = float(child.stdout)
    assert before - 0.05 <= started <= before + 1.0, (started - before)
