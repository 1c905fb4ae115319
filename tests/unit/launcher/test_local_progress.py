"""`orlhf pipeline` shows a running stage's progress lines (read from its log) as they come."""

import io
import shlex
import sys

from launcher.local import LogTail, run_showing_progress

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
