"""Start, watch and stop the three service processes of `orlhf ppo`.

Each service is its own process group (`start_new_session`): one Python process, or a
torchrun world of `nproc` processes, with its log in run_dir/ppo/<name>/service.log. The
shared secret travels in a 0600 file named by an environment variable, never in argv.
`Services` is a context manager: leaving it (success, failure, Ctrl-C, SIGTERM) asks each
service to shut down over HTTP, then signals whatever is left of its process group, so no
process outlives the run. While the actor waits on a call, every service process is
polled, so a dead service fails the run at once with one line naming it and its log.

A service with `services.NAME.het_group` set is not started here: it is a job step of the
Slurm heterogeneous job (`orlhf launch`), found on the first node of its het group at the
port derived from the job id (ppo_baseline.serve), with the job's token (PPO_TOKEN_FILE).
The job itself fails when such a step dies, so only its health and calls are watched here.

GPUs: a service started here gets GPUs of its own through CUDA_VISIBLE_DEVICES
(`service_gpus`): the node's visible GPUs after the ones the actor's processes of this node
take (torchrun's LOCAL_WORLD_SIZE; GPU local_rank each), one per service process, in
SERVICES order, or one refusal line when the node has too few. Without it every service's
rank 0 would take the actor's GPU 0 (its world's LOCAL_RANK is 0 too).
`services.share_gpus=true` keeps them on the actor's GPUs; without CUDA nothing changes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.http import http_url
from offline_rlhf.parallel.distributed import detect_env
from ppo_baseline.config import SERVICES, PPOConfig
from ppo_baseline.serve import (
    ADDRESS,
    CONFIG_ENV,
    TOKEN_ENV,
    VISIBLE_DEVICES,
    het_group_host,
    listed_gpus,
    service_config,
    service_dir,
    service_port,
)
from ppo_baseline.service import Client, NotOurService, ServiceError, read_token, write_token

LOG = "service.log"
TOKEN_FILE = "token"
POLL_S = 0.2
# Variables of an enclosing torchrun or Slurm world: a service starts a world of its own.
WORLD_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS")


class ServiceFailed(ConfigError):
    """A service died, did not start, or failed a call: one line naming it and its log."""

    def __init__(self, name: str, problem: str, log: Path):
        super().__init__(f"services.{name}", f"the {name} service {problem}", f"see its log {log}")
        self.service = name


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen | None  # None: a job step of the Slurm job, not started here
    log: Path
    client: Client | None = None
    url: str = ""

    def exit_code(self) -> int | None:
        return self.process.poll() if self.process is not None else None


@dataclass
class Services:
    """The three services of a run, started by `__enter__` and stopped by `__exit__`."""

    cfg: PPOConfig
    out: Path  # run_dir/ppo
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def __enter__(self) -> Services:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # start-up

    def start(self) -> None:
        remote = [name for name in SERVICES if getattr(self.cfg.services, name).het_group is not None]
        token_path = self._job_token() if remote else self.out / TOKEN_FILE
        if not remote:
            write_token(token_path)
        self._token = read_token(token_path)
        for name in remote:
            url = http_url(het_group_host(self.cfg, name), service_port(name))
            self.processes[name] = ServiceProcess(name, None, service_dir(self.cfg.run_dir, name) / LOG, url=url)
        gpus = service_gpus(self.cfg)
        env = {k: v for k, v in os.environ.items() if k not in WORLD_VARIABLES}
        if not torch.cuda.is_available():
            # Four processes share the CPU cores: OpenMP pools of every process spinning on
            # all cores made PPO iterations 50x slower at random (measured on 2 cores).
            env.setdefault("OMP_NUM_THREADS", "1")
        for name in SERVICES:
            if name not in remote:
                devices = {VISIBLE_DEVICES: ",".join(gpus[name])} if name in gpus else {}
                self.processes[name] = self._start_here(name, {**env, TOKEN_ENV: str(token_path), **devices})

    def _start_here(self, name: str, env: dict[str, str]) -> ServiceProcess:
        """Service `name` as a process group of this machine, watching this process."""
        folder = service_dir(self.cfg.run_dir, name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ADDRESS).unlink(missing_ok=True)
        config = service_config(self.cfg, name, self.cfg.services.host, parent_pid=os.getpid())
        write_atomic(folder / "service.json", config.to_json())
        log = folder / LOG
        with open(log, "ab") as handle:
            process = subprocess.Popen(service_command(config.settings.nproc), stdin=subprocess.DEVNULL, stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**env, CONFIG_ENV: str(folder / "service.json"), "PYTHONUNBUFFERED": "1"})
        return ServiceProcess(name, process, log)

    @staticmethod
    def _job_token() -> Path:
        """The token `orlhf launch` wrote for the whole heterogeneous job."""
        if TOKEN_ENV not in os.environ:
            raise ConfigError("services", f"services run in het groups, but {TOKEN_ENV} names no token file",
                              "launch the PPO stage with `orlhf launch cluster=slurm`")
        return Path(os.environ[TOKEN_ENV])

    def wait_ready(self) -> None:
        """Until every service answers /health as ready, proving it holds the run's token; a
        service that exits or is not ready within services.startup_timeout_s fails the run,
        and so does anything else answering at a service's address (on Slurm its port is
        predictable, and another user's process may hold it)."""
        deadline = time.monotonic() + self.cfg.services.startup_timeout_s
        waiting = set(self.processes)
        while waiting:
            for name in sorted(waiting):
                if self._ready(self.processes[name]):
                    waiting.discard(name)
            if waiting and time.monotonic() > deadline:
                name = sorted(waiting)[0]
                raise ServiceFailed(name, f"was not ready within services.startup_timeout_s="
                                    f"{self.cfg.services.startup_timeout_s:g}", self.processes[name].log)
            if waiting:
                time.sleep(POLL_S)

    def _ready(self, service: ServiceProcess) -> bool:
        self.check_alive()
        address = service_dir(self.cfg.run_dir, service.name) / ADDRESS
        if service.client is None:
            if not service.url and not address.exists():
                return False
            service.url = service.url or json.loads(address.read_text())["url"]
            service.client = Client(service.name, service.url, self._token,
                                    timeout_s=self.cfg.services.request_timeout_s, retries=2)
        try:
            return bool(service.client.health().get("ready"))
        except NotOurService as error:
            raise ServiceFailed(service.name, f"cannot be reached: {error}", service.log) from None
        except ServiceError:
            return False

    # calls

    def check_alive(self) -> None:
        for service in self.processes.values():
            code = service.exit_code()
            if code is not None:
                raise ServiceFailed(service.name, f"exited with code {code}{describe_signal(code)}", service.log)

    def call_all(self, calls: dict[str, Callable[[Client], object]], pool: ThreadPoolExecutor) -> dict[str, object]:
        """Run `calls` (service name -> fn(client)) concurrently; returns their results.
        Fails as soon as one call fails or any service process dies."""
        futures = {name: pool.submit(fn, self.processes[name].client) for name, fn in calls.items()}
        return self.results(futures)

    def results(self, futures: dict[str, Future]) -> dict[str, object]:
        pending = set(futures.values())
        while pending:
            done, pending = wait(pending, timeout=POLL_S, return_when=FIRST_EXCEPTION)
            for name, future in futures.items():
                if future in done and future.exception() is not None:
                    self.check_alive()  # a dead process is the better message
                    raise ServiceFailed(name, f"failed a call: {future.exception()}", self.processes[name].log)
            self.check_alive()
        return {name: future.result() for name, future in futures.items()}

    # shutdown

    def stop(self, grace_s: float = 15.0) -> None:
        """Ask each running service to shut down, then end whatever remains of its group."""
        for service in self.processes.values():
            if service.client is not None and service.exit_code() is None:
                try:
                    service.client.retries = 0
                    service.client.shutdown()
                except ServiceError:
                    pass
        deadline = time.monotonic() + grace_s
        started = [service.process for service in self.processes.values() if service.process is not None]
        for process in started:
            _wait_at_most(process, max(0.1, deadline - time.monotonic()))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for process in started:
                _signal_group(process, sig)
            for process in started:
                _wait_at_most(process, 5)
        for service in self.processes.values():
            if service.client is not None:
                service.client.close()


def _wait_at_most(process: subprocess.Popen, seconds: float) -> None:
    """Wait for the process to end, `seconds` at most (still running after them is no error)."""
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        pass


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """Signal the service's process group (its torchrun workers too), if any is left."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def service_gpus(cfg: PPOConfig, environ: Mapping[str, str] = os.environ) -> dict[str, list[str]]:
    """The GPUs (CUDA_VISIBLE_DEVICES entries) of each service the actor starts on its node:
    none without CUDA or with services.share_gpus (each service's ranks then pick the
    actor's first GPUs, as device_for gives a world's local ranks), else `place_services`
    after the actor's own processes of this node. Refused in one line when too few."""
    here = {name: getattr(cfg.services, name).nproc for name in SERVICES
            if getattr(cfg.services, name).het_group is None}
    if not here or cfg.services.share_gpus or not torch.cuda.is_available():
        return {}
    return place_services(here, actor_processes_here(environ), visible_gpus(environ, torch.cuda.device_count()))


def actor_processes_here(environ: Mapping[str, str]) -> int:
    """The actor's processes on this node (each on GPU local_rank, device_for): torchrun's
    LOCAL_WORLD_SIZE, a Slurm step's tasks on its first node (rank 0's: the services' node)
    when Slurm alone started the world, else the whole world, 1 for a single process."""
    env = detect_env(environ)
    if env.launcher == "torchrun":
        return int(environ.get("LOCAL_WORLD_SIZE") or env.world_size)
    if env.launcher == "slurm":
        for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
            first = re.match(r"\d+", environ.get(key, ""))  # "8(x2)" or "8,4": the first node's
            if first:
                return int(first.group())
    return env.world_size


def visible_gpus(environ: Mapping[str, str], count: int) -> list[str]:
    """The `count` GPUs this process sees, as CUDA_VISIBLE_DEVICES names them to a child
    process: its entries (indexes, UUIDs or MIG ids) when set, else 0..count-1."""
    if count <= 0:
        return []
    listed = listed_gpus(environ)
    return [str(index) for index in range(count)] if listed is None else listed[:count]


def place_services(nprocs: dict[str, int], actor: int, visible: list[str]) -> dict[str, list[str]]:
    """Consecutive GPUs of `visible` per service (name -> processes, in order), after the
    first `actor` ones (the actor's local ranks); one GPU per process, or one refusal line."""
    need = actor + sum(nprocs.values())
    if need > len(visible):
        services = ", ".join(f"{name} {count}" for name, count in nprocs.items())
        shown = f": {','.join(visible)}" if visible else ""
        raise ConfigError("services", f"the actor's {actor} process(es) on this node and the services started "
                          f"beside it ({services}) need {need} GPUs, one per process, but this node shows "
                          f"{len(visible)}{shown}", "run fewer actor processes per node or fewer service processes "
                          "(services.NAME.nproc), run the services on other nodes (`orlhf launch cluster=slurm`), "
                          "or set services.share_gpus=true to run them on the actor's GPUs (small models)")
    placed, first = {}, actor
    for name, count in nprocs.items():
        placed[name] = visible[first:first + count]
        first += count
    return placed


def service_command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "ppo_baseline.serve"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "ppo_baseline.serve"]


def describe_signal(code: int) -> str:
    if code < 0:
        try:
            return f" ({signal.Signals(-code).name})"
        except ValueError:
            return ""
    return ""
