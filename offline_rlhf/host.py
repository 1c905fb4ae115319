"""Processes on this host: when one started and whether it still runs, and the per-stage
lock file built on that. Imports no torch.

`stage_dir/.lock` holds its holder's host, PID, process start time (clock ticks since
boot, from /proc/<pid>/stat), the wall-clock time it was taken and, under Slurm, the job's
id, name and restart count. A lock whose holder is gone from this host (PID not running, or
running with another start time: the PID was reused) is stale and taken over. A lock held on
another host is broken only by a later run of the same Slurm job: the same job id with a
higher SLURM_RESTART_COUNT (a requeue, which Slurm starts only after the job's processes are
gone), or another job id of the same job name (`orlhf launch` continuation: its singleton
dependency started it after the holder's job ended, killed at its time limit say) once
squeue, where it answers, no longer lists the holder's job.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.fsutil import write_atomic

LOCK = ".lock"
_IMPORTED = time.time()
_JOB_ID = re.compile("[0-9]+(_[0-9]+)?")  # SLURM_JOB_ID, or an array task's <job>_<index>
SQUEUE_TIMEOUT_S = 10  # a controller that does not answer in this long: singleton alone vouches
COMPLETING_WAIT_S = 90  # a job's processes get KillWait (30 s by default) to exit after its end
# squeue's states of a job that has ended (it lists them for MinJobAge after the end)
_ENDED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                           "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"})


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    start_ticks: int | None  # None where /proc is missing: liveness then rests on the PID alone
    since: str
    job_id: str | None = None  # under Slurm: SLURM_JOB_ID and SLURM_JOB_NAME of the holder's job
    job_name: str | None = None
    restart_count: int = 0  # SLURM_RESTART_COUNT: how often Slurm requeued the job (locks written before: 0)

    def requeued_before(self, other: Holder) -> bool:
        """Whether this holder ran in `other`'s Slurm job before Slurm requeued it (node
        failure, preemption): the same job id, restarted fewer times."""
        return self.job_id is not None and self.job_id == other.job_id and self.restart_count < other.restart_count

    def earlier_attempt_of(self, other: Holder) -> bool:
        """Whether this holder ran in an earlier job of `other`'s Slurm job name: a
        continuation attempt waits (--dependency=singleton) for the last one to end."""
        return None not in (self.job_id, other.job_id, other.job_name) and self.job_id != other.job_id \
            and self.job_name == other.job_name


def start_ticks(pid: int | str) -> int | None:
    """The process's start time in clock ticks since boot, or None when it is not running
    (a zombie counts as gone). Field 22 of /proc/<pid>/stat; the name field (2) may hold
    spaces and parentheses, so fields are counted after its last ')'."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def process_started_at() -> float:
    """Epoch seconds at which this process was created (before the interpreter loaded
    anything); the import time of this module where /proc is missing."""
    ticks = start_ticks("self")
    if ticks is None or not hasattr(time, "CLOCK_BOOTTIME"):
        return _IMPORTED
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age if 0 <= age else _IMPORTED


def _alive(holder: Holder) -> bool:
    if not Path("/proc/self/stat").exists():  # no start times: the PID alone must do
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it runs, under another user
            pass
        return True
    ticks = start_ticks(holder.pid)
    return ticks is not None and (holder.start_ticks is None or ticks == holder.start_ticks)


def acquire_stage_lock(stage_dir: Path, stage: str) -> tuple[Path, str | None]:
    """Take `stage_dir/.lock` or raise a one-line ConfigError naming its holder. Returns the
    lock's path and a note when a stale lock was taken over."""
    path = Path(stage_dir) / LOCK
    mine = Holder(socket.gethostname(), os.getpid(), start_ticks("self"),
                  datetime.now(timezone.utc).isoformat(timespec="seconds"), os.environ.get("SLURM_JOB_ID"),
                  os.environ.get("SLURM_JOB_NAME"), _restart_count())
    note = None
    for _ in range(5):  # each pass either takes the lock, refuses, or removes one stale lock
        if _create(path, mine):
            return path, note
        held = _read(path)
        if held is None:  # released in between
            continue
        if held.host != mine.host:
            reason = _ended_elsewhere(held, mine, stage, path)
            if _remove_if_unchanged(path, held):
                note = f"{stage}: took over the lock of job {held.job_id} ({held.job_name}) on {held.host}: {reason}"
            continue
        if _alive(held):
            raise ConfigError("run_dir", f"{stage} in {stage_dir} is already running as pid {held.pid} on "
                              f"{held.host} since {held.since}", "wait for it to end or use another run_dir")
        if _remove_if_unchanged(path, held):
            note = (f"{stage}: took over the lock of pid {held.pid} (since {held.since}), "
                    "which is no longer running: a killed run")
    raise ConfigError("run_dir", f"could not take {path}: other runs keep replacing it", "run one at a time")


def _ended_elsewhere(held: Holder, mine: Holder, stage: str, path: Path) -> str:
    """Why the lock `held` on another host may be taken over (the end of the log line), or a
    one-line ConfigError naming the holder."""
    if held.requeued_before(mine):
        return f"its run before Slurm requeued it (restart {held.restart_count}), ended"
    if held.earlier_attempt_of(mine):
        state = _queued_state(held.job_id)
        if state is None:
            return "an earlier attempt of this job, ended"
        raise ConfigError("run_dir", f"{stage} in {path.parent} is locked by job {held.job_id} ({held.job_name}) on "
                          f"host {held.host}, which squeue still lists as {state}",
                          f"wait for it to end or cancel it: scancel {held.job_id}")
    raise ConfigError("run_dir", f"{stage} in {path.parent} is locked by pid {held.pid} on host {held.host} "
                      f"since {held.since}", f"if no {stage} run is alive there, delete {path}")


def _queued_state(job_id: str) -> str | None:
    """The state squeue lists the job in while it is queued or running, after waiting out a
    COMPLETING one (a singleton successor may start while the job's processes still exit);
    None when the job has ended or squeue cannot tell."""
    deadline = time.monotonic() + COMPLETING_WAIT_S
    while True:
        states = _squeue_states(job_id)
        if states != {"COMPLETING"} or time.monotonic() > deadline:
            return min(states, key=lambda state: state == "COMPLETING", default=None)  # the others first
        time.sleep(1)


def _squeue_states(job_id: str) -> set[str]:
    """The states squeue lists the job (each component of a heterogeneous one) in, ended ones
    left out. Empty also when squeue does not know the job (exit 1, "Invalid job id": purged,
    long ended) and when it is missing, fails or does not answer: then the launcher's
    --dependency=singleton alone vouches that the job ended. No shell: a list of arguments."""
    try:
        proc = subprocess.run(["squeue", "-h", f"--jobs={job_id}", "-o", "%T"], capture_output=True, text=True,
                              timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set() if proc.returncode else set(proc.stdout.split()) - _ENDED_STATES


def _restart_count() -> int:
    """SLURM_RESTART_COUNT, which Slurm sets from a job's first requeue on; 0 when unset."""
    value = os.environ.get("SLURM_RESTART_COUNT", "0").strip() or "0"
    if not re.fullmatch("[0-9]+", value):
        raise ConfigError("SLURM_RESTART_COUNT", f"{value!r} is not a restart count", "expected a whole number >= 0")
    return int(value)


def release_stage_lock(path: Path) -> None:
    """Remove the lock if it is still this process's (a takeover may have replaced it)."""
    held = _read(path)
    if held is not None and held.pid == os.getpid() and held.host == socket.gethostname():
        path.unlink(missing_ok=True)


def _create(path: Path, holder: Holder) -> bool:
    """Write a temporary file, then link() it to the lock's name: link fails when the lock
    exists, exactly like O_CREAT|O_EXCL, and the lock never appears without its content."""
    tmp = path.with_name(f"{LOCK}.{holder.pid}.tmp")
    try:
        tmp.write_text(json.dumps(asdict(holder)) + "\n")
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> Holder | None:
    """The lock's holder; its job id, which may reach squeue's command line, checked."""
    try:
        holder = Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        raise ConfigError("run_dir", f"{path} is not a lock this project wrote",
                          "delete it if no run of this stage is alive") from None
    if holder.job_id is not None and not (isinstance(holder.job_id, str) and _JOB_ID.fullmatch(holder.job_id)):
        raise ConfigError("run_dir", f"{path}: job_id {holder.job_id!r} is not a Slurm job id (expected digits, "
                          "optionally _<array index>)", "delete it if no run of this stage is alive")
    if type(holder.restart_count) is not int or holder.restart_count < 0:
        raise ConfigError("run_dir", f"{path}: restart_count {holder.restart_count!r} is not a whole number >= 0",
                          "delete it if no run of this stage is alive")
    return holder


def _remove_if_unchanged(path: Path, stale: Holder) -> bool:
    """Move the stale lock aside and delete it; if another process replaced it meanwhile
    (it took the lock first), put that lock back."""
    aside = path.with_name(f"{LOCK}.{os.getpid()}.stale")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return False
    try:
        if _read(aside) == stale:
            return True
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        return False
    finally:
        aside.unlink(missing_ok=True)


DONE = "DONE"  # a stage's last write (stage_support.mark_done)
CONFIG_FILE = "config.yaml"  # the config a stage's outputs were made under
_NOT_OUTPUTS = (DONE, CONFIG_FILE, "launch.log")  # a rerun's first writes, and the launcher's log (`stage_outputs`)


def unwritable(stage_dir: Path) -> ConfigError | None:
    """Make the stage folder and write a scratch file in it (what really fails, for root too,
    on a read-only mount or below a regular file); the problem as one line, None when writable."""
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=stage_dir):
            pass
    except OSError as exc:
        return ConfigError("run_dir", f"the stage folder {stage_dir} is not writable "
                           f"({exc.strerror or type(exc).__name__}{f': {exc.filename}' if exc.filename else ''})",
                           "choose a writable run_dir, or fix the folder's permissions")
    return None


def claim_stage(stage_dir: Path, stage: str) -> tuple[Path, str | None]:
    """The stage folder made (and proven writable) and its lock taken: (lock, note about a
    lock taken over); a one-line ConfigError when either fails."""
    problem = unwritable(stage_dir)
    if problem is not None:
        raise problem
    return acquire_stage_lock(stage_dir, stage)


def open_stage(stage_dir: Path, note: str | None, config_text: str) -> dict[str, str | None]:
    """A stage's first writes once it holds the lock: the old DONE goes before anything else
    changes, so a killed rerun never leaves DONE beside a new config.yaml. Returns what the
    two files held before (None: absent), for `restore_stage`."""
    if note:
        print(note, flush=True)
    earlier = {CONFIG_FILE: _text_or_none(stage_dir / CONFIG_FILE), **clear_done(stage_dir)}
    (stage_dir / CONFIG_FILE).write_text(config_text)
    return earlier


def clear_done(stage_dir: Path) -> dict[str, str | None]:
    """Remove a stage's DONE before its rerun changes anything; returns what it held, for
    `restore_stage`."""
    earlier = {DONE: _text_or_none(stage_dir / DONE)}
    (stage_dir / DONE).unlink(missing_ok=True)
    return earlier


def restore_stage(stage_dir: Path, earlier: dict[str, str | None]) -> None:
    """Undo `open_stage` for a rerun that stopped before writing anything (a refused resume,
    a missing input, a stop during start-up): a pipeline then finds the stage complete under
    its old config again."""
    for name, text in earlier.items():
        if text is None:
            (stage_dir / name).unlink(missing_ok=True)
        else:
            write_atomic(stage_dir / name, text)


def stage_outputs(stage_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under the stage folder (relative path -> size, modification time in ns),
    but the ones a run writes before its stage starts (DONE, config.yaml, the lock, the
    launcher's log): whether a failed rerun changed the stage's outputs."""
    found = {}
    for path in stage_dir.rglob("*") if stage_dir.is_dir() else ():
        relative = path.relative_to(stage_dir)
        if relative.parts[0] in _NOT_OUTPUTS or relative.parts[0].startswith(LOCK):
            continue
        try:
            status = path.stat()
        except FileNotFoundError:  # removed while listed: it changed
            found[str(relative)] = (-1, -1)
            continue
        if path.is_file():
            found[str(relative)] = (status.st_size, status.st_mtime_ns)
    return found


def _text_or_none(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None
