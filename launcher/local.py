"""Run a pipeline's stages one after the other on this machine."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

from omegaconf import OmegaConf

from launcher.plan import STAGE_MODULE, StagePlan, waits_for

DONE = "DONE"  # every stage writes it last, once its outputs are complete
# How stages mark a progress line in a log file (offline_rlhf.progress.PREFIX; the launcher
# imports nothing of offline_rlhf, a test keeps the two equal).
PROGRESS_PREFIX = "[progress] "
POLL_S = 1.0
# A training stage stopped by SIGTERM/SIGUSR1 after saving a checkpoint exits with this status and
# logs a line holding STOP_LINE (offline_rlhf.train.loop; tests check both on real stops); under
# torchrun the stage exits 1, and only that line tells a stop from a failure.
STOPPED_EXIT_CODE = 75
STOP_LINE = ": stopped by a signal ("
ERROR_LINE = re.compile(r"orlhf \S+: error: ")  # how a stage says why it failed (offline_rlhf.cli)
# The last line of a Python traceback, for a stage that crashed without its own error line;
# torchrun's summary of its failed workers (ChildFailedError) says nothing of the cause.
EXCEPTION_LINE = re.compile(r"(?!torch\.distributed\.elastic\.)[\w.]*(Error|Exception): ")
# Stages whose killed runs keep their work (fsynced shards, call logs, each model's answers):
# a relaunch resumes them (offline_rlhf.cli.RESUMABLE less the training stages, which stop
# with STOP_LINE; tests/unit/launcher/test_local_signals.py keeps them equal).
KEEPS_PARTIAL_WORK = ("generate", "label", "reference", "eval", "judge")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
# Sent to the stage as SIGTERM, so that a training stage saves a checkpoint (it takes SIGTERM).
AS_SIGTERM = (signal.SIGINT, signal.SIGHUP)
# Left ignored when ignored at the start: nohup (SIGHUP), a script's background job (SIGINT).
KEPT_IGNORED = (signal.SIGINT, signal.SIGHUP)
# Run as `python -c ORPHAN_GUARD LAUNCHER_PID COMMAND...`, it becomes the stage (exec) once the
# kernel will send it SIGTERM when the launcher dies (PR_SET_PDEATHSIG = 1, kept across exec):
# a launcher SIGKILLed (OOM killer, kill -9) no longer leaves its stage running on, holding the
# stage's lock. Not `preexec_fn`, which runs Python between fork and exec and may deadlock when
# the caller has other threads (tests call run_locally beside threads of their own). A launcher
# that died before prctl took effect is no longer the parent: nothing runs. (The kernel signals
# when the thread that started the stage ends: that thread waits for it.) Under torchrun the
# signal reaches torchrun, whose handler sends SIGTERM to each worker's process group (the
# training loop saves a checkpoint and stops) and SIGKILLs those still running after
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default 30 s), then exits itself.
ORPHAN_GUARD = ("import ctypes, os, signal, sys\n"
                "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
                "if os.getppid() != int(sys.argv[1]):\n"
                "    sys.exit(128 + signal.SIGTERM)\n"
                "os.execvp(sys.argv[2], sys.argv[2:])\n")


def local_command(plan: StagePlan, python: str) -> list[str]:
    """torchrun for several processes (`--standalone` picks a free port, so two local runs
    do not collide); a plain interpreter for one."""
    stage = ["-m", STAGE_MODULE, plan.stage, *plan.args]
    if plan.world_size == 1:
        return [python, *stage]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.procs_per_node}", *stage]


def is_complete(plan: StagePlan) -> bool:
    """The stage wrote its DONE marker last, under the same resolved config (a run folder
    moved whole since counts as the same: `_moved`)."""
    config = plan.config_file
    if not ((plan.stage_dir / DONE).exists() and config.exists()):
        return False
    written, planned = _parsed(config.read_text()), _parsed(plan.config_yaml)
    if isinstance(written, dict) and isinstance(planned, dict) and written.get("run_dir") != planned.get("run_dir"):
        written = _moved(written, str(written.get("run_dir")), str(planned.get("run_dir")))
    return written == planned


def _parsed(yaml_text: str):
    """Compare configs by value: the order keys are printed in is not a change."""
    return OmegaConf.to_container(OmegaConf.create(yaml_text))


def _moved(value, old: str, new: str):
    """`value` with every path inside the run folder `old` (and `old` itself) under `new`:
    a config written before the folder moved (scratch to project storage), as the stage's
    own resume check reads it (offline_rlhf.stage_support.within_run)."""
    if isinstance(value, dict):
        return {key: _moved(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_moved(item, old, new) for item in value]
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new.rstrip("/") + value[len(old.rstrip("/")):]
    return value


def stages_to_run(plans: list[StagePlan]) -> list[bool]:
    """Which stages a (re)run runs: those not complete with the same config, and every stage
    that waits for one that runs (it reads what that one writes again; `waits_for`), so a
    complete stage beside one that runs (another alignment method) is skipped, as are complete
    stages of other replicates' chains."""
    runs: list[bool] = []
    for plan, waits in zip(plans, waits_for(plans)):
        runs.append(any(runs[position] for position in waits) or not is_complete(plan))
    return runs


def forget_if_complete(plan: StagePlan) -> None:
    """A stage complete under the same config that runs again only because an earlier stage
    ran (its inputs changed) loses its DONE now: were the run to die before the stage clears
    DONE itself, a relaunch would skip the stale outputs. (A stage whose config changed keeps
    its DONE until it opens its folder: a refused resume leaves it complete.)"""
    if is_complete(plan):
        (plan.stage_dir / DONE).unlink()


def run_locally(plans: list[StagePlan], python: str, dry_run: bool) -> int:
    """Stops at the first stage that fails (1) or stops (75, STOPPED_EXIT_CODE: a training stage
    saved a checkpoint on a signal, or this launcher was signalled); each stage's output is
    appended to `<stage>/launch.log`. A rerun skips the stages complete (`stages_to_run`);
    replicates (launcher.seeds) run one after another."""
    for index, (plan, runs) in enumerate(zip(plans, stages_to_run(plans)), 1):
        command = local_command(plan, python)
        log = plan.stage_dir / "launch.log"
        if not runs:
            print(f"[{index}/{len(plans)}] {plan.name}: already complete, skipped", flush=True)
            continue
        print(f"[{index}/{len(plans)}] {plan.name}: {shlex.join(command)}", flush=True)
        if dry_run:
            continue
        plan.stage_dir.mkdir(parents=True, exist_ok=True)
        forget_if_complete(plan)
        print(f"    log: {log}", flush=True)
        start = time.monotonic()
        run = run_showing_progress(command, log, sys.stdout, workers_apart=plan.world_size > 1)
        if run.code != 0 or run.signal:
            return _report_end(plan.name, plan.stage, run)
        print(f"    done in {time.monotonic() - start:.1f} s", flush=True)
    return 0


def _report_end(name: str, stage: str, run: StageRun) -> int:
    """Say on the console why the pipeline ends at stage `name` (an `orlhf STAGE`): the stage's
    own last error or stop line (buried in the log, under torchrun's dump of its failed
    workers), then whether it stopped (STOPPED_EXIT_CODE: a relaunch continues) or failed (1)."""
    own = run.last_own_line()
    if own:
        _tell(f"    {own}")
    received = f" on {signal.Signals(run.signal).name}" if run.signal else ""
    status = f"killed by {signal.Signals(-run.code).name}" if run.code < 0 else f"exit code {run.code}"
    if run.code == 0:
        end = f"stopped{received} after stage {name} completed; relaunch to continue"
    elif run.code == STOPPED_EXIT_CODE or STOP_LINE in own:
        end = f"stage {name} stopped{received} (a checkpoint was saved; relaunch to resume)"
    elif run.signal and stage in KEEPS_PARTIAL_WORK:
        end = f"stage {name} stopped{received} ({status}; the work it saved is kept); relaunch to resume"
    elif run.signal:
        end = f"stage {name} stopped{received} ({status}, no checkpoint); relaunch to run it again"
    else:
        _tell(f"orlhf launch: stage {name} failed ({status}); log: {run.log}")
        return 1
    _tell(f"orlhf launch: {end}; log: {run.log}")
    return STOPPED_EXIT_CODE


def _tell(line: str) -> None:
    """`line` on stderr, unless the terminal hung up (EIO): the stage's end is in its log and in
    this launcher's exit status, which must stay 75 or 1, not a traceback's."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


@dataclass
class StageRun:
    """How one attempt of a stage ended: its exit status, the first stop signal this launcher
    received and forwarded meanwhile (None: none), and where its output starts in the log."""

    code: int
    signal: int | None
    log: Path
    offset: int

    def last_own_line(self) -> str:
        """The attempt's last `orlhf STAGE: error: ...` or signal-stop line, else the last
        exception line of a traceback ('' if none)."""
        with open(self.log, "rb") as handle:
            handle.seek(self.offset)
            lines = handle.read().decode(errors="replace").splitlines()
        own = next((line.strip() for line in reversed(lines) if ERROR_LINE.match(line) or STOP_LINE in line), "")
        return own or next((line.strip() for line in reversed(lines) if EXCEPTION_LINE.match(line)), "")


def run_showing_progress(command: list[str], log: Path, out: TextIO, workers_apart: bool = False) -> StageRun:
    """Run `command` with its output appended to `log` (after a line naming the attempt),
    showing its latest progress line on `out` while it runs: rewritten in place on a terminal,
    else a new line whenever it changes. SIGTERM, SIGINT, SIGUSR1 and SIGHUP sent to this process
    meanwhile go to the stage (`SignalForwarder`), which is waited for; on Linux the stage gets
    SIGTERM if this process dies (`ORPHAN_GUARD`)."""
    with open(log, "a") as handle:
        handle.write(f"[orlhf launch {datetime.now().astimezone().isoformat(timespec='seconds')}] "
                     f"{shlex.join(command)}\n")
        handle.flush()
        offset = handle.tell()
        with SignalForwarder(workers_apart) as forwarder:
            # A session of its own: a signal for the launcher's group (a terminal's Ctrl-C)
            # reaches the stage only through the forwarder, once.
            process = subprocess.Popen(_guarded(command), stdout=handle, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            forwarder.attach(process.pid)
            _show_progress(process, LogTail(log, offset), out)
    return StageRun(process.returncode, forwarder.received, log, offset)


def _guarded(command: list[str]) -> list[str]:
    """`command` started through ORPHAN_GUARD on Linux; as it is elsewhere."""
    if sys.platform != "linux" or not sys.executable:
        return command
    return [sys.executable, "-I", "-S", "-c", ORPHAN_GUARD, str(os.getpid()), *command]


def _show_progress(process: subprocess.Popen, tail: LogTail, out: TextIO) -> None:
    shown, live, showing = "", out.isatty(), True
    while not _ended(process):
        latest = tail.latest_progress() if showing else ""
        if latest and latest != shown:
            shown = latest
            try:
                out.write(f"\r    {latest}\x1b[K" if live else f"    {latest}\n")
                out.flush()
            except OSError:  # a terminal that hung up (EIO): show no more, still wait for the stage
                showing = live = False
    if live and shown:
        out.write("\n")  # the next output starts on a line of its own


class SignalForwarder:
    """While a stage runs, the signals that would end this launcher (leaving the stage running
    on, orphaned) are passed on to the stage instead (SIGINT and SIGHUP as SIGTERM, so that
    Ctrl-C or a closed terminal too lets a training stage save a checkpoint; one ignored when
    the launcher started stays ignored: KEPT_IGNORED): to its process group, or with `workers_apart`
    (torchrun) to each worker's own session (torchrun starts them so). torchrun itself is
    spared: it dies of SIGUSR1 and kills its workers 30 s after a SIGTERM, possibly mid-save,
    and it ends by itself once they have. The handlers in place before are restored on exit.
    Only the main thread may install handlers; elsewhere nothing changes."""

    def __init__(self, workers_apart: bool):
        self.workers_apart, self.pid, self.received, self.previous = workers_apart, None, None, {}

    def __enter__(self) -> SignalForwarder:
        if threading.current_thread() is threading.main_thread():
            taken = [sig for sig in FORWARDED_SIGNALS
                     if sig not in KEPT_IGNORED or signal.getsignal(sig) != signal.SIG_IGN]
            self.previous = {sig: signal.signal(sig, self._forward) for sig in taken}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            # None: a handler installed outside Python, which cannot be reinstalled; the default.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def attach(self, pid: int) -> None:
        """Forward to the stage started as `pid`, including a signal that came while it started."""
        self.pid = pid
        if self.received is not None:
            self._forward(self.received, None)

    def _forward(self, signum: int, frame) -> None:
        self.received = self.received or signum
        if self.pid is None:
            return
        # Ctrl-C and SIGHUP stop the stage as SIGTERM does: a training stage saves a checkpoint first.
        sent = signal.SIGTERM if signum in AS_SIGTERM else signum
        workers = _children(self.pid) if self.workers_apart else []
        for pid in workers or [self.pid]:
            _signal_group(pid, sent)


def _signal_group(pid: int, signum: int) -> None:
    """Signal the process group `pid` leads, or `pid` alone if it leads none; nothing if it ended."""
    for send in (os.killpg, os.kill):
        try:
            send(pid, signum)
            return
        except ProcessLookupError:
            continue


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc; [] elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _ended(process: subprocess.Popen) -> bool:
    """Wait up to POLL_S for the process (returning at once when it ends)."""
    try:
        process.wait(timeout=POLL_S)
    except subprocess.TimeoutExpired:
        return False
    return True


class LogTail:
    """The lines appended to a growing log since the last look (a partial last line waits)."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset, self.partial = path, offset, b""

    def latest_progress(self) -> str:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = self.partial + handle.read()
            self.offset = handle.tell()
        *lines, self.partial = data.split(b"\n")
        marked = [line for line in lines if line.startswith(PROGRESS_PREFIX.encode())]
        return marked[-1][len(PROGRESS_PREFIX):].decode(errors="replace").strip() if marked else ""
