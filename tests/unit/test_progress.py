"""Progress on a terminal is a live bar; in a file it is plain periodic lines a pipeline
can pick up, never carriage-return frames."""

import io

from launcher.local import PROGRESS_PREFIX
from offline_rlhf.progress import PREFIX, Progress, clock, plain_status


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_in_a_file_progress_is_plain_prefixed_lines():
    out = io.StringIO()
    bar = Progress("sft", 4, enabled=True, stream=out, every_s=0.0)
    for step in range(4):
        bar.update(1, loss=f"{2.0 - step / 4:.2f}")
    bar.write("step 4 validation: loss 1.1")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split(" | ")[0] for line in lines[:4]] == [
        f"{PREFIX}sft: step {n}/4 ({25 * n}%) loss={2.0 - (n - 1) / 4:.2f}" for n in range(1, 5)]
    assert lines[4] == "step 4 validation: loss 1.1" and len(lines) == 5  # close repeats nothing


def test_plain_lines_are_throttled_but_the_end_is_always_shown():
    out = io.StringIO()
    bar = Progress("generate", 100, initial=40, stream=out, every_s=3600.0, unit="prompt")
    for _ in range(30):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then the state at close
    assert lines[0].startswith(f"{PREFIX}generate: prompt 41/100 (41%)")
    assert lines[1].startswith(f"{PREFIX}generate: prompt 70/100 (70%)")


def test_disabled_progress_prints_nothing_and_a_terminal_gets_a_bar():
    quiet = io.StringIO()
    bar = Progress("rm", 3, enabled=False, stream=quiet, every_s=0.0)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""
    terminal = Terminal()
    bar = Progress("rm", 3, stream=terminal, every_s=0.0)
    bar.update(3, acc="0.9")
    bar.close()
    assert "\r" in terminal.getvalue() and PREFIX not in terminal.getvalue()
    assert "acc=0.9" in terminal.getvalue()


def test_status_line_and_eta():
    assert plain_status("sft", 40, 120, 0, 40.0, {"loss": "2.31"}, "step") == \
        "sft: step 40/120 (33%) loss=2.31 | 0:40 elapsed, ETA 1:20"
    # resumed at 100: the rate counts only this run's steps
    assert plain_status("sft", 110, 120, 100, 20.0, {}, "step").endswith("0:20 elapsed, ETA 0:20")
    assert plain_status("x", 5, 5, 0, 3.0, {}, "item").endswith("| 0:03 elapsed")
    assert clock(3725) == "1:02:05" and clock(59.9) == "0:59"


def test_no_eta_from_the_first_units_of_work():
    # one answer of 1600, one step of 60: the start-up dominates; an ETA would be off many times over
    assert "ETA" not in plain_status("eval sft", 1, 1600, 0, 0.3, {}, "answer")
    assert "ETA" not in plain_status("rm", 1, 60, 0, 12.0, {}, "step")
    assert "ETA" not in plain_status("rm", 2, 60, 0, 20.0, {}, "step")  # under 5% of the run
    assert plain_status("rm", 3, 60, 0, 30.0, {}, "step").endswith("0:30 elapsed, ETA 9:30")  # 5%
    # a resume counts this run's units: 2 of the 20 left (10%) shows one, 1 does not
    assert plain_status("sft", 102, 120, 100, 4.0, {}, "step").endswith("ETA 0:36")
    assert "ETA" not in plain_status("sft", 101, 120, 100, 2.0, {}, "step")


def test_a_terminal_bar_counts_in_the_unit_of_work():
    terminal = Terminal()
    bar = Progress("eval sft", 3, stream=terminal, unit="answer")
    bar.update(3)
    bar.close()
    assert "answer/s" in terminal.getvalue() or "s/answer" in terminal.getvalue()
    assert "it/s" not in terminal.getvalue() and "s/it" not in terminal.getvalue()


def test_the_launcher_looks_for_the_prefix_stages_write():
    assert PROGRESS_PREFIX == PREFIX
