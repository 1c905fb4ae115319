"""`orlhf launch cluster=local` with real stages: a refused resume keeps the stage's DONE and
its one-line reason reaches the console; a signal to the launcher stops the running stage (it
saves a checkpoint) instead of orphaning it; a relaunch resumes there."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.compose import compose_launch
from launcher.local import DONE, KEEPS_PARTIAL_WORK, STOPPED_EXIT_CODE, run_locally
from launcher.plan import plan_pipeline
from offline_rlhf.checkpoint import latest_checkpoint
from offline_rlhf.train.loop import STOPPED_EXIT_CODE as LOOP_STOPPED_EXIT_CODE
from tests.fixtures import REPO_ROOT

DEADLINE_S = 240
HEADER = re.compile(r"^\[orlhf launch \d{4}-\d\d-\d\dT[^\]]+\] ", re.M)


def launch_args(run_dir: Path, *sft, nproc: int = 2) -> list[str]:
    """The embedded task, then a tiny SFT on it (the demo's model) on `nproc` processes."""
    overrides = ", ".join(f"'{item}'" for item in (
        "model=demo", "data=embedded_task_sft", "init.tokenizer=${run_dir}/task/tokenizer", "train.global_batch=32",
        "train.micro_batch=16", "train.val_every=0", "train.save_every=100000", "logging.progress=false", *sft))
    return ["pipeline=demo", f"run_dir={run_dir}",
            f"pipeline.stages=[{{stage: task}}, {{stage: sft, nproc: {nproc}, overrides: [{overrides}]}}]"]


def plans_for(run_dir: Path, *sft, nproc: int = 2):
    return plan_pipeline(compose_launch(launch_args(run_dir, *sft, nproc=nproc)))


def steps_logged(stage_dir: Path) -> int:
    metrics = stage_dir / "metrics.jsonl"
    return metrics.read_text().count('"train/loss"') if metrics.exists() else 0


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def pids_naming(text: str) -> list[int]:
    """Live processes whose command line mentions `text` (zombies have none)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(int(cmdline.parent.name))
    return found


def saved_step(stage_dir: Path) -> int:
    return int(latest_checkpoint(stage_dir / "checkpoints").name.removeprefix("step_"))


def test_the_launcher_knows_the_training_loops_stop_status():
    assert STOPPED_EXIT_CODE == LOOP_STOPPED_EXIT_CODE


@pytest.mark.slow  # real stages, torchrun or one process
def test_a_refused_resume_keeps_done_and_its_reason_reaches_the_console(tmp_path, capsys):
    """The reviewer's case: a finished pipeline relaunched with another SFT learning rate.
    The launcher used to drop DONE before starting the stage, so the stage had none to restore."""
    run_dir = tmp_path / "run"
    assert run_locally(plans_for(run_dir, "train.max_steps=3", "optim.lr=3e-3"), sys.executable, False) == 0
    sft = run_dir / "sft"
    done, config = (sft / DONE).read_text(), (sft / "config.yaml").read_text()
    capsys.readouterr()

    assert run_locally(plans_for(run_dir, "train.max_steps=3", "optim.lr=2e-3"), sys.executable, False) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-2].startswith("    orlhf sft: error: optim.lr: differs from the run that wrote "), err
    assert err[-1] == f"orlhf launch: stage sft failed (exit code 1); log: {sft / 'launch.log'}"
    assert (sft / DONE).read_text() == done and (sft / "config.yaml").read_text() == config
    log = (sft / "launch.log").read_text()
    assert len(HEADER.findall(log)) == 2 and "ChildFailedError" in log  # both attempts, torchrun's dump kept

    assert run_locally(plans_for(run_dir, "train.max_steps=3", "optim.lr=3e-3"), sys.executable, False) == 0
    assert "[2/2] sft: already complete, skipped" in capsys.readouterr().out


def test_a_stage_rerun_because_an_earlier_one_ran_loses_done_but_one_that_dies_before_opening_keeps_it(
        tmp_path, capsys):
    """`--cfg` makes a stage exit 0 without opening its folder; a bad override makes it exit 2."""
    (smoke,) = plan_pipeline(compose_launch(["pipeline=smoke", f"run_dir={tmp_path / 'a'}"]))
    first = replace(smoke, args=(*smoke.args, "--cfg"), procs_per_node=1)
    later = replace(first, name="later", stage_dir=tmp_path / "later")
    for plan, text in ((first, "old: 1\n"), (later, later.config_yaml)):
        plan.stage_dir.mkdir(parents=True)
        (plan.stage_dir / DONE).write_text("outputs\n")
        plan.config_file.write_text(text)
    assert run_locally([first, later], sys.executable, dry_run=False) == 0
    # `first` changed config: the stage clears its own DONE (here it never opened); `later` is
    # complete under its config but its inputs are rewritten: a dead run must not leave its DONE.
    assert (first.stage_dir / DONE).exists() and not (later.stage_dir / DONE).exists()

    broken = replace(first, args=(*smoke.args, "parallel.tp=0"))
    assert run_locally([broken], sys.executable, dry_run=False) == 1
    assert (first.stage_dir / DONE).read_text() == "outputs\n"
    err = capsys.readouterr().err.splitlines()
    assert err[-2].startswith("    orlhf smoke: error: parallel.tp"), err


@pytest.mark.slow  # real stages, torchrun or one process
def test_sigterm_to_the_launcher_stops_the_torchrun_stage_and_a_relaunch_resumes_until_sigusr1(tmp_path):
    """The launcher used to exit 143 at once while the stage ran on, orphaned, and wrote DONE."""
    run_dir = tmp_path / "run"
    sft = run_dir / "sft"
    command = [sys.executable, "-m", "offline_rlhf.cli", "launch", *launch_args(run_dir, "train.max_steps=5000")]

    first = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: steps_logged(sft) >= 3 or first.poll() is not None, "three SFT steps")
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=DEADLINE_S)
    assert first.returncode == STOPPED_EXIT_CODE, err
    stopped_at = saved_step(sft)
    assert stopped_at >= 3
    assert f"    sft: stopped by a signal (SIGTERM/SIGUSR1/Ctrl-C) after saving step {stopped_at} " in err
    assert err.splitlines()[-1] == ("orlhf launch: stage sft stopped on SIGTERM (a checkpoint was saved; relaunch "
                                    f"to resume); log: {sft / 'launch.log'}")
    assert not pids_naming(str(run_dir)) and not (sft / DONE).exists()  # nothing left running

    second = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: steps_logged(sft) >= stopped_at + 3 or second.poll() is not None, "three more SFT steps")
    second.send_signal(signal.SIGUSR1)
    out, err = second.communicate(timeout=DEADLINE_S)
    assert second.returncode == STOPPED_EXIT_CODE, err
    assert "[1/2] task: already complete, skipped" in out
    assert saved_step(sft) >= stopped_at + 3 and "stage sft stopped on SIGUSR1 (a checkpoint was saved" in err
    assert not pids_naming(str(run_dir)) and not (sft / DONE).exists()
    log = (sft / "launch.log").read_text()
    attempts = HEADER.split(log)[1:]
    assert len(attempts) == 2 and f"after saving step {stopped_at} " in attempts[0]
    assert f"resuming from {sft / 'checkpoints' / f'step_{stopped_at:08d}'}" in attempts[1]


@pytest.mark.slow  # real stages, torchrun or one process
def test_ctrl_c_stops_a_one_process_stage_with_a_checkpoint_and_restores_the_handlers(tmp_path, capsys):
    """SIGINT reaches the stage as SIGTERM (its own session keeps a terminal's Ctrl-C off it)."""
    run_dir = tmp_path / "run"
    plans = plans_for(run_dir, "train.max_steps=5000", nproc=1)
    # Ctrl-C at a terminal: SIGINT handled, as Python does by default. A test run started in
    # the background (`make test &`) inherits SIGINT ignored, which the launcher keeps so.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    finished = threading.Event()

    def press_ctrl_c():
        deadline = time.monotonic() + DEADLINE_S
        while steps_logged(run_dir / "sft") < 3 and time.monotonic() < deadline and not finished.is_set():
            time.sleep(0.1)
        if not finished.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    try:
        code = run_locally(plans, sys.executable, dry_run=False)
        restored = {sig: signal.getsignal(sig) for sig in before}
    finally:
        finished.set()
        presser.join()
        signal.signal(signal.SIGINT, inherited)
    err = capsys.readouterr().err
    assert code == STOPPED_EXIT_CODE, err
    assert "stage sft stopped on SIGINT (a checkpoint was saved; relaunch to resume)" in err
    assert saved_step(run_dir / "sft") >= 3 and not (run_dir / "sft" / DONE).exists()
    assert restored == before


def signal_soon(signum: int, ready: Path) -> threading.Thread:
    """Send `signum` to this process once `ready` exists (the stage has started)."""

    def send():
        wait_for(ready.exists, str(ready))
        os.kill(os.getpid(), signum)

    sender = threading.Thread(target=send)
    sender.start()
    return sender


def shell_stages(tmp_path: Path, body: str):
    """Two plans whose 'interpreter' is a bash script running `body` (it ignores the stage's
    arguments): real processes in place of stages that keep no checkpoint."""
    script = tmp_path / "stage.sh"
    script.write_text(f"#!/bin/bash\n{body}\n")
    script.chmod(0o755)
    (smoke,) = plan_pipeline(compose_launch(["pipeline=smoke", f"run_dir={tmp_path / 'run'}"]))
    first = replace(smoke, name="first", stage_dir=tmp_path / "first", procs_per_node=1)
    return str(script), [first, replace(first, name="next", stage_dir=tmp_path / "next")]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stopped_by(tmp_path, capsys, command: str, sig: signal.Signals, flag: Path) -> str:
    """Run two shell stages, the first `command`, sending this launcher `sig` once `flag`
    exists; the launcher's last line on stderr."""
    python, plans = shell_stages(tmp_path, command)
    sender = signal_soon(sig, flag)
    assert run_locally(plans, python, dry_run=False) == STOPPED_EXIT_CODE
    sender.join()
    return capsys.readouterr().err.splitlines()[-1]


def test_a_signal_ends_the_stages_whole_process_group_and_nothing_after_it_starts(tmp_path, capsys):
    child = tmp_path / "child.pid"
    last = stopped_by(tmp_path, capsys, f"sleep 120 & echo $! > {child}; wait", signal.SIGTERM, child)
    assert last == ("orlhf launch: stage first stopped on SIGTERM (killed by SIGTERM, no checkpoint); relaunch "
                    f"to run it again; log: {tmp_path / 'first' / 'launch.log'}")
    deadline = time.monotonic() + 10  # the stage's own child got the signal too, and is gone
    while alive(int(child.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(int(child.read_text())) and not (tmp_path / "next").exists()


def test_a_stage_that_completes_despite_the_signal_is_the_last_to_run(tmp_path, capsys):
    ready = tmp_path / "ready"
    last = stopped_by(tmp_path, capsys, f"trap 'exit 0' USR1; touch {ready}; sleep 120 & wait", signal.SIGUSR1, ready)
    assert last == ("orlhf launch: stopped on SIGUSR1 after stage first completed; relaunch to continue; "
                    f"log: {tmp_path / 'first' / 'launch.log'}")
    assert not (tmp_path / "next").exists()


def test_a_stopped_stage_that_keeps_its_work_says_a_relaunch_resumes(tmp_path, capsys):
    """generate's fsynced shards, eval's answers...: the launcher said "no checkpoint; relaunch to
    run it again", and the relaunch resumed."""
    python, plans = shell_stages(tmp_path, f"touch {tmp_path / 'ready'}; sleep 120 & wait")
    plans = [replace(plan, stage="generate") for plan in plans]
    sender = signal_soon(signal.SIGTERM, tmp_path / "ready")
    assert run_locally(plans, python, dry_run=False) == STOPPED_EXIT_CODE
    sender.join()
    assert capsys.readouterr().err.splitlines()[-1] == (
        "orlhf launch: stage first stopped on SIGTERM (killed by SIGTERM; the work it saved is kept); relaunch to "
        f"resume; log: {tmp_path / 'first' / 'launch.log'}")


def test_the_stages_that_keep_partial_work_are_the_resumable_ones_without_checkpoints():
    from offline_rlhf.cli import RESUMABLE

    assert set(KEEPS_PARTIAL_WORK) == RESUMABLE - {"sft", "rm", "align", "ppo", "launch", "pipeline"}


def test_a_stage_that_crashed_with_a_traceback_shows_its_exception(tmp_path, capsys):
    """The console said only "failed (exit code 1)"; the cause was at the end of the log,
    above torchrun's summary of its failed workers."""
    crash = ("echo 'Traceback (most recent call last):'; echo '  File \"x.py\", line 1'; "
             "echo 'Exception: expected `,` or `}` at line 1 column 7'; "
             "echo 'torch.distributed.elastic.multiprocessing.errors.ChildFailedError: '; echo '====='; exit 1")
    python, plans = shell_stages(tmp_path, crash)
    assert run_locally(plans, python, dry_run=False) == 1
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "    Exception: expected `,` or `}` at line 1 column 7",
        f"orlhf launch: stage first failed (exit code 1); log: {tmp_path / 'first' / 'launch.log'}"]
