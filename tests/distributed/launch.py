"""Run a test function in N real gloo processes (the same code path torchrun uses).

The processes are forked from the test session, as PyTorch's DataLoader forks its workers:
a spawned process spent seconds of CPU importing torch and warming it up (two per world,
about a hundred worlds a suite: tests/distributed took 650 s spawned, 430 s forked on the
2-core machine). Each rank sets its own environment, thread count and process group, so
what it runs is what a torchrun rank runs. A session that has initialized CUDA spawns
instead (a forked child cannot use its parent's CUDA context)."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, out_dir: str, args: tuple, pg_timeout: float | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from offline_rlhf.parallel.distributed import detect_env, init_distributed, shutdown_distributed

    init_distributed(detect_env())
    if pg_timeout is not None:  # cut once every rank is in (a slow start must not trip it)
        import torch.distributed as dist

        dist.barrier()
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=pg_timeout))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        shutdown_distributed()
    # Skip interpreter teardown: under heavy CPU load, gloo's background threads were seen
    # to abort the process (std::terminate) while static objects were destroyed, after the
    # result was saved. The result is on disk; nothing else needs cleaning up.
    os._exit(0)


def run_distributed(fn, world_size: int, tmp_path: Path, *args, timeout: float = 240.0,
                    pg_timeout: float | None = None) -> list:
    """Call fn(rank, world_size, *args) in `world_size` spawned processes; returns each
    rank's return value (saved with torch.save) in rank order. `pg_timeout`: the default
    process group's timeout in seconds once every rank started (None: init_distributed's)."""
    out_dir = Path(tmp_path) / f"dist_{fn.__name__}_{time.monotonic_ns()}"
    out_dir.mkdir(parents=True)
    start_method = "spawn" if torch.cuda.is_initialized() else "fork"
    context = mp.start_processes(_entry, args=(world_size, free_port(), fn, str(out_dir), args, pg_timeout),
                                 nprocs=world_size, join=False, start_method=start_method)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} did not finish in {timeout} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
