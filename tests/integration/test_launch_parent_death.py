"""`orlhf launch cluster=local` whose driver dies or loses its terminal while a real training
stage runs: the stage used to run on, orphaned in its own session, holding its stage lock (a
relaunch was refused, the later stages never ran). Now a SIGKILLed driver's stage gets SIGTERM
from the kernel (PR_SET_PDEATHSIG) and a SIGHUP is forwarded as SIGTERM: either way the stage
saves a checkpoint and stops, and a relaunch resumes there."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from launcher.local import DONE, STOPPED_EXIT_CODE
from tests.fixtures import REPO_ROOT
from tests.unit.launcher.test_local_signals import (
    HEADER,
    launch_args,
    pids_naming,
    saved_step,
    steps_logged,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")]

ENDS_WITHIN_S = 120  # the stage finishes its step, saves and exits (torchrun: its workers first)
STOPPED = "sft: stopped by a signal (SIGTERM/SIGUSR1/Ctrl-C) after saving step "


def launch(run_dir: Path, *sft: str, nproc: int) -> list[str]:
    return [sys.executable, "-m", "offline_rlhf.cli", "launch", *launch_args(run_dir, *sft, nproc=nproc)]


def ended_within(run_dir: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while pids_naming(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not pids_naming(str(run_dir))


@pytest.fixture
def run_dir(tmp_path):
    """The run folder; whatever still runs in it at the end (an orphan) is killed."""
    yield tmp_path / "run"
    for pid in pids_naming(str(tmp_path / "run")):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_and_train(run_dir: Path, nproc: int) -> subprocess.Popen:
    """The driver of the embedded task then a long SFT, once SFT logged three steps."""
    # SIGHUP at its default, as in a terminal: a test run under nohup would pass it on ignored.
    driver = subprocess.Popen(launch(run_dir, "train.max_steps=5000", nproc=nproc), cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    wait_for(lambda: steps_logged(run_dir / "sft") >= 3 or driver.poll() is not None, "three SFT steps")
    assert driver.poll() is None, driver.communicate()
    return driver


@pytest.mark.parametrize("nproc", [1, 2])  # one process; torchrun, which passes SIGTERM on to its workers
def test_a_sigkilled_launchers_stage_saves_and_stops_and_a_relaunch_completes(run_dir, nproc):
    sft = run_dir / "sft"
    driver = start_and_train(run_dir, nproc)
    driver.kill()
    driver.communicate(timeout=30)
    assert ended_within(run_dir, ENDS_WITHIN_S), "the stage runs on without its launcher"
    stopped_at = saved_step(sft)
    attempt = HEADER.split((sft / "launch.log").read_text())[-1]
    assert f"{STOPPED}{stopped_at} " in attempt and stopped_at >= 3 and not (sft / DONE).exists()

    # Its lock is gone with it: the relaunch resumes and finishes two steps later.
    relaunch = subprocess.run(launch(run_dir, f"train.max_steps={stopped_at + 2}", nproc=nproc), cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=600)
    assert relaunch.returncode == 0, relaunch.stderr
    assert "[1/2] task: already complete, skipped" in relaunch.stdout and (sft / DONE).exists()
    assert f"resuming from {sft / 'checkpoints' / f'step_{stopped_at:08d}'}" in (sft / "launch.log").read_text()
    assert saved_step(sft) == stopped_at + 2


def test_sighup_to_the_launcher_stops_the_stage_as_sigterm_does(run_dir):
    """A closed terminal or ssh session: the launcher used to die of it, leaving the stage."""
    sft = run_dir / "sft"
    driver = start_and_train(run_dir, nproc=1)
    driver.send_signal(signal.SIGHUP)
    out, err = driver.communicate(timeout=ENDS_WITHIN_S)
    assert driver.returncode == STOPPED_EXIT_CODE, (driver.returncode, err)
    stopped_at = saved_step(sft)
    assert f"    {STOPPED}{stopped_at} " in err and stopped_at >= 3
    assert err.splitlines()[-1] == ("orlhf launch: stage sft stopped on SIGHUP (a checkpoint was saved; relaunch "
                                    f"to resume); log: {sft / 'launch.log'}")
    assert not pids_naming(str(run_dir)) and not (sft / DONE).exists()


def test_a_terminal_that_hangs_up_stops_the_stage_and_the_launcher_says_stopped(run_dir):
    """A real hangup: the driver's terminal (a pty it controls) closes. The stage stops and
    saves as on SIGHUP above, and the driver exits 75 although it can no longer write its last
    lines (EIO): it used to fail on them and exit 1."""
    sft = run_dir / "sft"
    terminal, driver_side = pty.openpty()

    def own_the_terminal():
        os.setsid()
        fcntl.ioctl(1, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    driver = subprocess.Popen(launch(run_dir, "train.max_steps=5000", nproc=1), cwd=REPO_ROOT,
                              stdin=subprocess.DEVNULL, stdout=driver_side, stderr=driver_side,
                              preexec_fn=own_the_terminal)
    os.close(driver_side)

    def drained_and_trained() -> bool:
        while select.select([terminal], [], [], 0)[0]:
            os.read(terminal, 65536)  # a full pty would block the driver's writes
        return steps_logged(sft) >= 3 or driver.poll() is not None

    wait_for(drained_and_trained, "three SFT steps")
    assert driver.poll() is None
    os.close(terminal)  # the hangup: SIGHUP to the driver, EIO on every later write
    assert driver.wait(timeout=ENDS_WITHIN_S) == STOPPED_EXIT_CODE
    assert saved_step(sft) >= 3 and not (sft / DONE).exists()
    assert not pids_naming(str(run_dir))
