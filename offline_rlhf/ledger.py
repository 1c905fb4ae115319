"""Device-hour accounting: one JSON line per stage execution in `run_dir/ledger.jsonl`.

A resumed stage appends a new row, so a stage's cost is the sum of its rows. A stage
killed outright (SIGKILL, node failure, Slurm time limit) cannot write its row, so while
it runs a background thread rewrites a heartbeat file every BEAT_SECONDS; the next
execution of that stage turns a leftover heartbeat into an `interrupted` row ending at
the last beat. A row starts when its process was created (imports and start-up are part
of a stage's cost) or, for a later stage in the same process, when the previous one
ended. Slurm runs carry the job id, node count and GPUs per node so cluster costs add up
the same way.

Each row also says whether its execution continued earlier ones' work (`resumed`: from a
checkpoint or partial outputs they wrote), so the executions behind a stage's result are
known (`result_chain`): a rerun that starts fresh replaces what the earlier ones made. An
execution killed before it knew (in its start-up) is recorded as resumed: if it would have
started fresh, a later execution can only have resumed what one after it made, and the walk
back stops at that one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from offline_rlhf.data.errors import DataError
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.host import process_started_at

if TYPE_CHECKING:  # no torch at import: torch-free stages (`orlhf judge`) keep rows too
    import torch

    from offline_rlhf.parallel.distributed import DistEnv

LEDGER = "ledger.jsonl"
HEARTBEAT_DIR = ".ledger"
BEAT_SECONDS = 5.0
STALE_BEATS = 6  # a heartbeat this many beats old belongs to a process that is gone
_previous_end = 0.0  # epoch seconds at which this process's last tracked stage ended


COMPLETED, FAILED, INTERRUPTED = "completed", "failed", "interrupted"  # a row's status
STATUSES = (COMPLETED, FAILED, INTERRUPTED)


@dataclass
class LedgerRow:
    stage: str
    start: str
    end: str
    status: str  # one of STATUSES
    nodes: int
    processes: int
    devices: int
    device_type: str
    wall_seconds: float
    device_hours: float
    tokens: int
    job_id: str | None = None
    gpus_per_node: int | None = None
    resumed: bool | None = None  # continued earlier executions' work; None: a row written before rows said


def result_chain(rows: list[LedgerRow]) -> list[bool]:
    """Per row of one stage (in ledger order), whether its execution produced the stage's
    result: the last completed one and, walking back while an execution resumed, the ones it
    continued (whatever their status) down to the fresh start. Earlier ones were superseded,
    later ones have not completed. The walk passes over a failed execution that counted no
    token (refused at the start, crashed before its first step or write): it left nothing to
    continue. (A killed one's heartbeat may lag its count, so killed ones are never passed
    over.) From a row that does not say whether it resumed (written before rows did) back,
    the older rule holds: every completed or interrupted execution."""
    flags = [False] * len(rows)
    last = max((k for k, row in enumerate(rows) if row.status == COMPLETED), default=-1)
    for k in range(last, -1, -1):
        if rows[k].status == FAILED and not rows[k].tokens:
            continue
        flags[k] = True
        if rows[k].resumed is None:
            return [flag or (j < k and row.status != FAILED) for j, (flag, row) in enumerate(zip(flags, rows))]
        if not rows[k].resumed:
            break
    return flags


class Usage:
    """Handed to the stage while it runs: it reports tokens, and a stage that continues an
    earlier execution's work sets `resumed`; `beat()` runs in the background (a stage may
    also call it, e.g. right after new tokens)."""

    def __init__(self, row: LedgerRow, heartbeat: Path | None, started: float):
        self.tokens = 0
        # Ended early without an exception (a PPO service whose actor died): its row reads interrupted.
        self.interrupted = False
        self._resumed: bool | None = None  # not known yet; stages that never resume leave it so
        self._row = row
        self._heartbeat = heartbeat
        self._start = time.monotonic() - (time.time() - started)  # `started` on the monotonic clock
        self._last_beat = float("-inf")
        self._beating = threading.Lock()  # the thread and the stage write the same file

    @property
    def resumed(self) -> bool | None:
        return self._resumed

    @resumed.setter
    def resumed(self, value: bool) -> None:
        self._resumed = value
        self.beat(force=True)  # a kill before the next beat must not leave a heartbeat that says otherwise

    def beat(self, force: bool = False) -> None:
        with self._beating:
            now = time.monotonic()
            if self._heartbeat is None or (not force and now - self._last_beat < BEAT_SECONDS):
                return
            self._last_beat = now
            write_atomic(self._heartbeat, json.dumps(asdict(self.finish(INTERRUPTED))))

    def finish(self, status: str) -> LedgerRow:
        """The row as of now. Never told whether it resumed: a stage that ended did not (only
        its last completion counts); one killed may not have known yet (see the module)."""
        wall = time.monotonic() - self._start
        resumed = self._resumed if self._resumed is not None else status == INTERRUPTED
        return LedgerRow(**{**asdict(self._row), "status": status, "end": _now(), "wall_seconds": round(wall, 3),
                            "device_hours": self._row.devices * wall / 3600, "tokens": self.tokens,
                            "resumed": resumed})


@dataclass(frozen=True)
class OneProcess:
    """The environment of a stage that runs in this one process on the CPU without torch."""

    rank: int = 0
    world_size: int = 1
    is_main: bool = True


@contextmanager
def track(run_dir: str | Path, stage: str, env: DistEnv | OneProcess, device: torch.device | str):
    """Time the block and append its row on rank 0, also when the stage fails.
    Each process drives one device (a GPU, or a CPU process slot), so devices = processes."""
    global _previous_end
    heartbeat = Path(run_dir) / HEARTBEAT_DIR / f"{stage}.json" if env.is_main else None
    if heartbeat is not None:
        _recover_interrupted(run_dir, heartbeat)
    started = max(process_started_at(), _previous_end)
    usage = Usage(_opening_row(stage, env, device, started), heartbeat, started)
    usage.beat(force=True)
    stop = threading.Event()
    beater = threading.Thread(target=_beat_until, args=(usage, stop), name=f"ledger-{stage}", daemon=True)
    beater.start()
    status = FAILED
    try:
        yield usage
        status = INTERRUPTED if usage.interrupted else COMPLETED
    except (SystemExit, KeyboardInterrupt):  # a signal stop (its work saved: resumable), or Ctrl-C: not an error
        status = INTERRUPTED
        raise
    finally:
        stop.set()
        beater.join()  # no beat may recreate the heartbeat after it is removed
        _previous_end = time.time()
        if heartbeat is not None:
            append_row(run_dir, usage.finish(status))
            heartbeat.unlink(missing_ok=True)


def _beat_until(usage: Usage, stop: threading.Event) -> None:
    """Stages that never call `beat()` (label, eval, mix, rm-score) still leave a recent
    heartbeat when killed. A failed write only loses accounting, never the stage."""
    while not stop.wait(BEAT_SECONDS):
        try:
            usage.beat(force=True)
        except OSError:
            pass


def _opening_row(stage: str, env: DistEnv | OneProcess, device: torch.device | str, started: float) -> LedgerRow:
    start = datetime.fromtimestamp(started, timezone.utc).isoformat()
    return LedgerRow(stage=stage, start=start, end="", status="running", nodes=node_count(env),
                     processes=env.world_size, devices=env.world_size, device_type=device_name(device),
                     wall_seconds=0.0, device_hours=0.0, tokens=0, job_id=os.environ.get("SLURM_JOB_ID"),
                     gpus_per_node=_cuda().device_count() if _is_cuda(device) else None)


def _recover_interrupted(run_dir: str | Path, heartbeat: Path) -> None:
    if heartbeat.exists():
        append_row(run_dir, _row(heartbeat, 1, heartbeat.read_text()))
        heartbeat.unlink()


def device_name(device: torch.device | str) -> str:
    return _cuda().get_device_name(device) if _is_cuda(device) else "cpu"


def _is_cuda(device: torch.device | str) -> bool:
    return getattr(device, "type", device) == "cuda"


def _cuda():
    import torch  # only where a CUDA device exists, so torch is loaded already

    return torch.cuda


def node_count(env: DistEnv | OneProcess, environ=os.environ) -> int:
    if "SLURM_NNODES" in environ:
        return int(environ["SLURM_NNODES"])
    per_node = int(environ.get("LOCAL_WORLD_SIZE", env.world_size))
    return max(1, env.world_size // max(per_node, 1))


def append_row(run_dir: str | Path, row: LedgerRow) -> None:
    path = Path(run_dir) / LEDGER
    path.parent.mkdir(parents=True, exist_ok=True)
    # One write() of one line on an O_APPEND file: rows from concurrent stages never interleave.
    with open(path, "a") as handle:
        handle.write(json.dumps(asdict(row)) + "\n")


def read_ledger(run_dir: str | Path) -> list[LedgerRow]:
    """The ledger's rows; a line that is not one (torn, edited) is an error naming it."""
    path = Path(run_dir) / LEDGER
    if not path.exists():
        return []
    return [_row(path, number, line) for number, line in enumerate(path.read_text().splitlines(), start=1)
            if line.strip()]


def _row(path: Path, number: int, line: str) -> LedgerRow:
    try:
        row = LedgerRow(**json.loads(line))
    except (ValueError, TypeError) as err:  # not JSON, not an object, or other fields
        raise DataError(path, number, f"expected a ledger row, a JSON object with the fields of LedgerRow ({err}); "
                        "repair or delete that line") from None
    if row.status not in STATUSES:
        raise DataError(path, number, f"expected a ledger row, its status one of {', '.join(STATUSES)} (got "
                        f"{row.status!r}); repair or delete that line")
    return row


def killed(run_dir: str | Path) -> list[LedgerRow]:
    """The executions killed without their ledger row (it is appended when the stage runs
    again, `_recover_interrupted`): each one's last heartbeat (status interrupted), older
    than a running stage's would be. A damaged heartbeat is an error naming it."""
    folder, rows = Path(run_dir) / HEARTBEAT_DIR, []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            row = _row(path, 1, path.read_text())
        except FileNotFoundError:  # its stage ended meanwhile: its row is in the ledger now
            continue
        if time.time() - datetime.fromisoformat(row.end).timestamp() > STALE_BEATS * BEAT_SECONDS:
            rows.append(row)
    return rows


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()

