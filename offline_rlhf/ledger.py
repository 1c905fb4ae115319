"""Device-hour accounting: one JSON line per stage execution in `run_dir/ledger.jsonl`.

A resumed stage appends a new row, so a stage's cost is the sum of its rows. Slurm runs
carry the job id, node count and GPUs per node so cluster costs add up the same way.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from offline_rlhf.parallel.distributed import DistEnv

LEDGER = "ledger.jsonl"


@dataclass
class LedgerRow:
    stage: str
    start: str
    end: str
    status: str  # "completed" or "failed"
    nodes: int
    processes: int
    devices: int
    device_type: str
    wall_seconds: float
    device_hours: float
    tokens: int
    job_id: str | None = None
    gpus_per_node: int | None = None


@dataclass
class Usage:
    """Filled in by the stage while it runs (tokens processed)."""

    tokens: int = 0


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def node_count(env: DistEnv, environ=os.environ) -> int:
    if "SLURM_NNODES" in environ:
        return int(environ["SLURM_NNODES"])
    per_node = int(environ.get("LOCAL_WORLD_SIZE", env.world_size))
    return max(1, env.world_size // max(per_node, 1))


@contextmanager
def track(run_dir: str | Path, stage: str, env: DistEnv, device: torch.device):
    """Time the block and append its row on rank 0, also when the stage fails.
    Each process drives one device (a GPU, or a CPU process slot), so devices = processes."""
    usage = Usage()
    start_wall, start = time.monotonic(), datetime.now(timezone.utc)
    status = "failed"
    try:
        yield usage
        status = "completed"
    finally:
        if env.is_main:
            wall = time.monotonic() - start_wall
            row = LedgerRow(stage=stage, start=start.isoformat(), end=datetime.now(timezone.utc).isoformat(),
                            status=status, nodes=node_count(env), processes=env.world_size,
                            devices=env.world_size, device_type=device_name(device), wall_seconds=round(wall, 3),
                            device_hours=env.world_size * wall / 3600, tokens=usage.tokens,
                            job_id=os.environ.get("SLURM_JOB_ID"),
                            gpus_per_node=_gpus_per_node(device))
            append_row(run_dir, row)


def _gpus_per_node(device: torch.device) -> int | None:
    return torch.cuda.device_count() if device.type == "cuda" else None


def append_row(run_dir: str | Path, row: LedgerRow) -> None:
    path = Path(run_dir) / LEDGER
    path.parent.mkdir(parents=True, exist_ok=True)
    # One write() of one line on an O_APPEND file: rows from concurrent stages never interleave.
    with open(path, "a") as handle:
        handle.write(json.dumps(asdict(row)) + "\n")


def read_ledger(run_dir: str | Path) -> list[LedgerRow]:
    path = Path(run_dir) / LEDGER
    if not path.exists():
        return []
    return [LedgerRow(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
