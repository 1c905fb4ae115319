"""A resumed stage's metrics: a torn last line of metrics.jsonl (a kill or a full disk
mid-write) no longer stops the resume with a traceback; damage before it is one line naming
it; the file is rewritten only when there is something to drop; TensorBoard and W&B carry
on the same curves instead of overlapping or splitting them."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import tracemalloc
import types

import pytest

from offline_rlhf.config.schema import LoggingConfig
from offline_rlhf.data.errors import DataError
from offline_rlhf.metrics import METRICS_FILE, read_metrics
from offline_rlhf.train.metrics_log import WANDB_ID_FILE, MetricsLog


def write_rows(path, steps, tail: str = "") -> None:
    path.write_text("".join(json.dumps({"step": step, "train/loss": 1.0 / step}) + "\n" for step in steps) + tail)


def test_a_torn_last_line_is_left_out_and_the_resume_goes_on(tmp_path):
    path = tmp_path / METRICS_FILE
    write_rows(path, range(1, 6), tail='{"step": 6, "train/lo')
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]  # the report reads it too
    MetricsLog(tmp_path, LoggingConfig(progress=False), is_main=True, resumed_step=5, total_steps=9).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_a_damaged_line_before_the_last_names_the_file_and_line(tmp_path):
    path = tmp_path / METRICS_FILE
    write_rows(path, [1])
    with open(path, "a") as handle:
        handle.write("\x00\x00garbage\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(DataError) as info:
        read_metrics(tmp_path)
    assert str(info.value).startswith(f"{path}:2: expected a JSON object of one step's metrics")


def test_the_file_is_rewritten_only_when_steps_past_the_checkpoint_are_dropped(tmp_path):
    path = tmp_path / METRICS_FILE
    write_rows(path, range(1, 6))
    inode = path.stat().st_ino
    MetricsLog(tmp_path, LoggingConfig(progress=False), is_main=True, resumed_step=5, total_steps=9).close()
    assert path.stat().st_ino == inode  # nothing to drop: not read and written back
    MetricsLog(tmp_path, LoggingConfig(progress=False), is_main=True, resumed_step=3, total_steps=9).close()
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3]


def installed(monkeypatch, name: str, **attributes) -> types.ModuleType:
    """A stand-in for an optional package, recording how it is called."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_tensorboard_drops_the_steps_a_killed_run_logged_past_its_checkpoint(tmp_path, monkeypatch):
    writers = []

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            writers.append(purge_step)

    installed(monkeypatch, "tensorboard")
    installed(monkeypatch, "torch.utils.tensorboard", SummaryWriter=SummaryWriter)
    for resumed in (0, 40):
        MetricsLog(tmp_path, LoggingConfig(tensorboard=True, progress=False), True, resumed, 100).close()
    # TensorBoard removes the events at steps >= 1 (a fresh start: a killed first run's), >= 41
    assert writers == [1, 41]


def test_wandb_resumes_the_stages_own_run_only_where_it_ended(tmp_path, monkeypatch):
    """W&B ignores a step it already has: a run that logged steps past its checkpoint is
    continued in a new W&B run (as a fresh start is), not under values of the abandoned one."""
    calls = []
    ids = iter(["first", "second", "third"])
    installed(monkeypatch, "wandb", init=lambda **kwargs: calls.append(kwargs),
              util=types.SimpleNamespace(generate_id=lambda: next(ids)))
    stage = tmp_path / "sft"
    stage.mkdir()
    logging = LoggingConfig(wandb=True, progress=False)
    MetricsLog(stage, logging, True, 0, 100).close()
    write_rows(stage / METRICS_FILE, range(1, 41))
    MetricsLog(stage, logging, True, 40, 100).close()  # resumed where the first ended: the same W&B run
    write_rows(stage / METRICS_FILE, range(1, 46))
    MetricsLog(stage, logging, True, 40, 100).close()  # steps 41-45 logged again: a new W&B run
    assert [(call["id"], call["resume"], call["name"]) for call in calls] == [
        ("first", "allow", "sft"), ("first", "allow", "sft"), ("second", "allow", "sft")]
    assert (stage / WANDB_ID_FILE).read_text() == "second"


def resume(stage_dir, step: int) -> None:
    MetricsLog(stage_dir, LoggingConfig(progress=False), is_main=True, resumed_step=step, total_steps=10**6).close()


def test_a_long_file_is_streamed_not_read_whole(tmp_path):
    """100k rows took 5 s and their size many times over in memory on every resume."""
    path = tmp_path / METRICS_FILE
    rows = [{"step": step, "train/loss": 1.0 / step, "train/lr": 3e-6, "train/tokens_per_s": 1234.5 * step}
            for step in range(1, 20_001)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 20001, "train/lo')
    tracemalloc.start()
    try:
        resume(tmp_path, 19_990)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size / 4
    assert path.read_text() == "".join(json.dumps(row) + "\n" for row in rows[:19_990])  # as rewritten before


def test_damage_and_tears_are_found_as_before(tmp_path):
    """Blank lines are skipped (and left out of a rewrite); a tear followed only by blank
    lines is a torn last line; damage before a row stops the resume naming file and line,
    as the report's reader does, the file left as it was."""
    path = tmp_path / METRICS_FILE
    write_rows(path, [1, 2, 3], tail='\n{"step": 4}\n\n{"step": 5, "train/lo\n\n')
    resume(tmp_path, 9)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    damaged = path.read_text().replace('{"step": 2,', '{"step": 2 ', 1) + "\n" + json.dumps({"step": 5}) + "\n"
    path.write_text(damaged)
    with pytest.raises(DataError) as info:
        resume(tmp_path, 1)
    with pytest.raises(DataError) as reader:
        read_metrics(tmp_path)
    assert str(info.value) == str(reader.value)
    assert str(info.value).startswith(f"{path}:2: expected a JSON object of one step's metrics")
    assert path.read_text() == damaged
