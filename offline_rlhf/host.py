"""Processes on this host: when one started and whether it still runs, and the per-stage
lock file built on that. Imports no torch.

`stage_dir/.lock` holds its holder's host, PID, process start time (clock ticks since
boot, from /proc/<pid>/stat) and the wall-clock time it was taken. A lock whose holder
is gone from this host (PID not running, or running with another start time: the PID
was reused) is stale and taken over. A lock held on another host is broken only by a later
attempt of the same Slurm job name (`orlhf launch` continuation: its singleton dependency
started it after the holder's job ended, killed at its time limit say, on any node).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.fsutil import write_atomic

LOCK = ".lock"
_IMPORTED = time.time()


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    start_ticks: int | None  # None where /proc is missing: liveness then rests on the PID alone
    since: str
    job_id: str | None = None  # under Slurm: SLURM_JOB_ID and SLURM_JOB_NAME of the holder's job
    job_name: str | None = None

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
                  os.environ.get("SLURM_JOB_NAME"))
    note = None
    for _ in range(5):  # each pass either takes the lock, refuses, or removes one stale lock
        if _create(path, mine):
            return path, note
        held = _read(path)
        if held is None:  # released in between
            continue
        if held.host != mine.host and held.earlier_attempt_of(mine):
            if _remove_if_unchanged(path, held):
                note = (f"{stage}: took over the lock of job {held.job_id} ({held.job_name}) on {held.host}: an "
                        "earlier attempt of this job, ended")
            continue
        if held.host != mine.host:
            raise ConfigError("run_dir", f"{stage} in {stage_dir} is locked by pid {held.pid} on host {held.host} "
                              f"since {held.since}", f"if no {stage} run is alive there, delete {path}")
        if _alive(held):
            raise ConfigError("run_dir", f"{stage} in {stage_dir} is already running as pid {held.pid} on "
                              f"{held.host} since {held.since}", "wait for it to end or use another run_dir")
        if _remove_if_unchanged(path, held):
            note = (f"{stage}: took over the lock of pid {held.pid} (since {held.since}), "
                    "which is no longer running: a killed run")
    raise ConfigError("run_dir", f"could not take {path}: other runs keep replacing it", "run one at a time")


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
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        raise ConfigError("run_dir", f"{path} is not a lock this project wrote",
                          "delete it if no run of this stage is alive") from None


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
    """Undo `open_stage` for a rerun that stopped before writing anything (a refused resume):
    a pipeline then finds the stage complete under its old config again."""
    for name, text in earlier.items():
        if text is None:
            (stage_dir / name).unlink(missing_ok=True)
        else:
            write_atomic(stage_dir / name, text)


def _text_or_none(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None
