"""`orlhf pipeline` shows a running stage's progress lines (read from its log) as they come."""

import errno
import io
import os
import shlex
import signal
import subprocess
import sys

import pytest

from launcher.local import ORPHAN_GUARD, LogTail, run_showing_progress

STAGE = ("import sys, time\n"
         "for step in range(1, 4):\n"
         "    print(f'noise {step}', flush=True)\n"
         "    print(f'[progress] sft: step {step}/3', file=sys.stderr, flush=True)\n"
         "    time.sleep(1.3)\n"
         "sys.exit(3)\n")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_lines_reach_the_console_and_everything_the_log(tmp_path):
    out, log = io.StringIO(), tmp_path / "launch.log"
    assert run_showing_progress([sys.executable, "-c", STAGE], log, out).code == 3
    shown = out.getvalue().splitlines()
    assert shown and all(line.startswith("    sft: step ") for line in shown)
    assert shown[-1] == "    sft: step 3/3" and len(shown) == len(set(shown))  # each change once
    assert "noise 2" in log.read_text() and "noise" not in out.getvalue()


def test_on_a_terminal_one_line_is_rewritten_and_ended(tmp_path):
    out = Terminal()
    run_showing_progress([sys.executable, "-c", STAGE], tmp_path / "launch.log", out)
    text = out.getvalue()
    assert text.startswith("\r    sft: step ") and text.endswith("sft: step 3/3\x1b[K\n") and text.count("\n") == 1


def test_a_partial_line_waits_for_its_end(tmp_path):
    log = tmp_path / "log"
    log.write_bytes(b"[progress] a: step 1/2\n[progress] a: st")
    tail = LogTail(log)
    assert tail.latest_progress() == "a: step 1/2"
    with open(log, "ab") as handle:
        handle.write(b"ep 2/2\nother\n")
    assert tail.latest_progress() == "a: step 2/2"
    assert tail.latest_progress() == ""  # nothing new


def test_each_attempt_is_appended_after_a_header_and_shows_only_its_own_progress(tmp_path):
    log, out = tmp_path / "launch.log", io.StringIO()
    run_showing_progress([sys.executable, "-c", STAGE], log, io.StringIO())
    quiet = [sys.executable, "-c", "print('orlhf sft: error: x: is wrong; fix it')"]
    run = run_showing_progress(quiet, log, out)
    assert out.getvalue() == ""  # the first attempt's progress lines are not this one's
    headers = [line for line in log.read_text().splitlines() if line.startswith("[orlhf launch ")]
    assert len(headers) == 2 and headers[1].endswith(f"] {shlex.join(quiet)}")
    assert "noise 3" in log.read_text() and run.code == 0
    assert run.last_own_line() == "orlhf sft: error: x: is wrong; fix it"


class HungUpTerminal(Terminal):
    def write(self, text):
        raise OSError(errno.EIO, "Input/output error")


def test_a_terminal_that_hung_up_stops_the_display_but_not_the_wait(tmp_path):
    """After SIGHUP the console is gone: writing to it fails, the stage is still waited for."""
    log = tmp_path / "launch.log"
    assert run_showing_progress([sys.executable, "-c", STAGE], log, HungUpTerminal()).code == 3
    assert "noise 3" in log.read_text()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_the_guard_runs_nothing_once_the_launcher_that_started_it_is_gone(tmp_path):
    """The launcher died before prctl (the guard's parent is another process): nothing runs;
    else the command runs with SIGTERM as its parent-death signal."""
    ran = tmp_path / "ran"
    guard = [sys.executable, "-I", "-S", "-c", ORPHAN_GUARD]
    assert subprocess.run([*guard, "1", "touch", str(ran)]).returncode == 128 + signal.SIGTERM
    assert not ran.exists()
    gets = "import ctypes, signal; n = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(n)); print(n.value)"
    shown = subprocess.run([*guard, str(os.getpid()), sys.executable, "-c", gets], capture_output=True, text=True)
    assert shown.stdout.strip() == str(int(signal.SIGTERM))  # what PR_GET_PDEATHSIG says the stage got


def test_a_sighup_ignored_from_the_start_stays_ignored(tmp_path):
    """`nohup orlhf pipeline ...`: a closed terminal must not stop the stage."""
    stage = "import os, signal, time; os.kill(os.getppid(), signal.SIGHUP); time.sleep(1.5); print('survived')"
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        run = run_showing_progress([sys.executable, "-c", stage], tmp_path / "launch.log", io.StringIO())
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
    assert run.code == 0 and run.signal is None and "survived" in (tmp_path / "launch.log").read_text()
