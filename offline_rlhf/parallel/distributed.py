"""Where am I? Detect torchrun, Slurm or a plain single process, and start the process group.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` with one
task per device, Slurm sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; the rendezvous host is
the first host of the job's node list and the port is derived from the job id, so every
task computes the same address without talking to the others.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from offline_rlhf.config.schema import ParallelConfig

DEFAULT_PORT = 29500
# Waits for the slowest rank's long work (a replica's whole share of prompts, rank 0 alone
# starting or calling the PPO services): bounded by the job's time limit, not by the
# process-group timeout. A rank that dies ends them at once (its sockets close).
LONG_WAIT = timedelta(days=7)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """torchrun's variables win (torchrun may itself run under srun), then Slurm's."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(rank=int(environ["RANK"]), world_size=int(environ["WORLD_SIZE"]),
                       local_rank=int(environ.get("LOCAL_RANK", 0)),
                       master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(environ.get("MASTER_PORT", DEFAULT_PORT)), launcher="torchrun")
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
        port = environ.get("MASTER_PORT") or str(slurm_port(environ.get("SLURM_JOB_ID", "0")))
        return DistEnv(rank=int(environ["SLURM_PROCID"]), world_size=int(environ["SLURM_NTASKS"]),
                       local_rank=int(environ.get("SLURM_LOCALID", 0)),
                       master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
                       master_port=int(port), launcher="slurm")
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=DEFAULT_PORT,
                   launcher="single")


# Ports a Slurm job derives from its id: the rendezvous in [20000, 26000), the PPO services'
# in [26000, 32768) (ppo_baseline.serve.service_port). Both stay below Linux's ephemeral range
# (32768-60999 by default), from which the node's outgoing connections (NCCL's among them)
# take their local ports: a port there may be in use when the job binds it.
RENDEZVOUS_PORTS = (20000, 6000)  # first port, how many


def slurm_port(job_id: str) -> int:
    """A port in [20000, 26000) that every task of one job derives identically."""
    first, count = RENDEZVOUS_PORTS
    return first + int(re.sub(r"\D", "", job_id) or 0) % count


# One host-list entry: a name whose bracket groups may hold commas ('rack[1-2]-node[01,04]').
_HOST_ENTRY = r"(?:[^,\[\]]|\[[^\[\]]+\])+"


def first_host(nodelist: str) -> str:
    """First host of a Slurm host list: 'gpu[003-005,9],cpu1' -> 'gpu003', and with several
    bracket groups in one name, 'rack[1-2]-node[01-04]' -> 'rack1-node01'."""
    text = nodelist.strip()
    if not re.fullmatch(rf"{_HOST_ENTRY}(?:,{_HOST_ENTRY})*", text):
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    first = re.match(_HOST_ENTRY, text)[0]
    return re.sub(r"\[([^\]]+)\]", lambda group: group[1].split(",")[0].split("-")[0], first)


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(env: DistEnv, timeout: timedelta = timedelta(minutes=ParallelConfig.timeout_min)) -> torch.device:
    """Start the default process group (NCCL on CUDA, gloo on CPU) when there is more than
    one process, its collectives failing after `timeout` (torch's own defaults are NCCL's
    10 and gloo's 30 minutes); returns this process's device."""
    device = device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return device


def long_wait_group(world_size: int) -> dist.ProcessGroup | None:
    """A gloo group of the whole world whose collectives (on CPU tensors and objects) wait
    up to LONG_WAIT: for barriers after work whose length differs between ranks by more than
    the default group's timeout. Collective: every rank creates it, in the same order."""
    return dist.new_group(backend="gloo", timeout=LONG_WAIT) if world_size > 1 else None


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
