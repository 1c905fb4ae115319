"""`python -m ppo_baseline.serve` (or under torchrun): one PPO service process or world.

`orlhf ppo` starts it with two environment variables, never arguments (argv is visible to
every user of the machine): PPO_SERVICE_CONFIG names the service's JSON config
(run_dir/ppo/<name>/service.json) and PPO_TOKEN_FILE the 0600 file holding the shared
secret. The service is a stage of its own for the ledger (`ppo_<name>`): its row covers
the whole life of the process, idle time included. Once listening, rank 0 writes
`address.json` (url, pid) beside its config, which the launcher waits for.

In a Slurm heterogeneous job (`orlhf launch`) a service is instead its own job step,
`orlhf ppo ... serve=NAME` (`serve_in_job`): it binds the first node of its het group on a
port derived from the job id, where the actor, in another component, finds it. A service
sharing its component with one before it (`reward_with_critic`) keeps only the GPUs after
that one's visible (`skip_gpus`, GPU_OFFSET_ENV).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Mapping, MutableMapping

import torch

from offline_rlhf.checkpoint import read_meta, resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.host import start_ticks
from offline_rlhf.parallel.distributed import first_host
from offline_rlhf.runtime import stage_runtime
from offline_rlhf.stage_support import local_checkpoint
from ppo_baseline.config import SERVICES, PPOConfig, ServiceConfig
from ppo_baseline.service import read_token
from ppo_baseline.services import build_service
from ppo_baseline.world import sigterm_exits, watch_parent

CONFIG_ENV = "PPO_SERVICE_CONFIG"
TOKEN_ENV = "PPO_TOKEN_FILE"
# Set by `orlhf launch` on the step of a service after another in its het group's component
# (launcher.ppo.Module.gpu_offset): the GPUs of its node before this one are the other's.
GPU_OFFSET_ENV = "PPO_GPU_OFFSET"
VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
ADDRESS = "address.json"


def service_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "ppo" / name


def service_config(cfg: PPOConfig, name: str, host: str, port: int = 0, parent_pid: int = 0) -> ServiceConfig:
    """What service `name` of the run `cfg` runs; `parent_pid`: the actor, whose exit stops it."""
    return ServiceConfig(name=name, run_dir=cfg.run_dir, settings=getattr(cfg.services, name), ppo=cfg.ppo,
                         host=host, port=port, max_body_mb=cfg.services.max_body_mb, parent_pid=parent_pid,
                         parent_start_ticks=start_ticks(parent_pid) if parent_pid else None, seed=cfg.seed,
                         keep_last=cfg.keep_last)


def het_group_host(cfg: PPOConfig, name: str, environ: Mapping[str, str] = os.environ) -> str:
    """The first node of the het group serving `name`, where its rank 0 listens."""
    group = getattr(cfg.services, name).het_group
    nodelist = environ.get(f"SLURM_JOB_NODELIST_HET_GROUP_{group}")
    if not nodelist:
        raise ConfigError(f"services.{name}.het_group", f"is {group}, but this process is in no Slurm heterogeneous "
                          f"job with that group (SLURM_JOB_NODELIST_HET_GROUP_{group} is unset)",
                          "launch it with `orlhf launch cluster=slurm`, or unset it to start the service here")
    return first_host(nodelist)


def service_port(name: str, environ: Mapping[str, str] = os.environ) -> int:
    """The HTTP port of service `name` in Slurm job SLURM_JOB_ID (in every component, the
    het job's leader id), so the service and the actor derive it alike. In [26000, 32768),
    clear of the rendezvous ports of offline_rlhf.parallel.distributed.slurm_port and below
    the ephemeral range (RENDEZVOUS_PORTS' comment); the port after it is the rendezvous
    port of the service's own world."""
    job = int(re.sub(r"\D", "", environ.get("SLURM_JOB_ID", "")) or 0)
    return 26000 + job % 845 * 8 + 2 * SERVICES.index(name)


def serve_in_job(cfg: PPOConfig) -> int:
    """`orlhf ppo serve=NAME`: service NAME as one job step of the heterogeneous job, one
    task per process (Slurm's rank 0 is on the component's first node)."""
    port = service_port(cfg.serve)
    os.environ["MASTER_PORT"] = str(port + 1)  # two services sharing a component need two rendezvous ports
    skip_gpus(cfg.serve, os.environ)  # before CUDA starts: it reads CUDA_VISIBLE_DEVICES once
    config = service_config(cfg, cfg.serve, host=het_group_host(cfg, cfg.serve), port=port)
    return run(config, read_token(os.environ[TOKEN_ENV]))


def skip_gpus(name: str, environ: MutableMapping[str, str]) -> None:
    """A step with GPU_OFFSET_ENV=N sees its node's GPUs from the N-th on: each process then
    takes GPU local rank of those (device_for), after the ones the service before it in its
    component takes. Nothing without the variable or without GPUs. The GPUs a process sees:
    CUDA_VISIBLE_DEVICES (Slurm sets it for a job with GPUs), else NVML's count, which
    leaves CUDA uninitialized."""
    offset = int(environ.get(GPU_OFFSET_ENV) or 0)
    if offset <= 0:
        return
    listed = listed_gpus(environ)
    visible = listed if listed is not None else [str(index) for index in range(torch.cuda.device_count())]
    if not visible:
        return
    if offset >= len(visible):
        raise ConfigError(f"services.{name}", f"its processes start at GPU {offset} of their node ({GPU_OFFSET_ENV}, "
                          f"after the service before it in its het group), but the node shows {len(visible)}",
                          "ask for more GPUs per node (gpus_per_node) or set services.share_gpus=true")
    environ[VISIBLE_DEVICES] = ",".join(visible[offset:])


def listed_gpus(environ: Mapping[str, str]) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES's entries (indexes, UUIDs or MIG ids); None when it is unset."""
    listed = environ.get(VISIBLE_DEVICES)
    return None if listed is None else [entry.strip() for entry in listed.split(",") if entry.strip()]


def run(cfg: ServiceConfig, token: str) -> int:
    key = f"services.{cfg.name}.checkpoint"
    # A Hugging Face model is imported once, into the run (the actor may be importing it too).
    cfg = replace(cfg, settings=replace(cfg.settings, checkpoint=local_checkpoint(cfg.settings.checkpoint,
                                                                                  cfg.run_dir, key)))
    model_cfg = read_meta(resolve_checkpoint(cfg.settings.checkpoint, key)).model
    # A SIGTERM (Slurm's time limit, the actor's last resort) still writes the ledger row.
    with sigterm_exits(), stage_runtime(f"ppo_{cfg.name}", cfg.run_dir, cfg.settings.parallel, model_cfg,
                                        cfg) as (rt, usage):
        service = build_service(cfg, rt, token, usage)
        if rt.is_main:
            service.start()
            if cfg.parent_pid:
                watch_parent(service, cfg.parent_pid, cfg.parent_start_ticks, usage)
            write_atomic(service_dir(cfg.run_dir, cfg.name) / ADDRESS,
                         json.dumps({"url": service.url, "pid": os.getpid()}))
            rt.log(f"{cfg.name} service ready on {service.url} ({rt.dims.world_size} process(es), "
                   f"TP={rt.dims.tp} x DP={rt.dims.dp}; weights {cfg.settings.checkpoint})")
        try:
            service.run_world()
        finally:
            if rt.is_main:
                service.stop()
        rt.log(stopped_message(cfg.name, service.step))
    return 0


def stopped_message(name: str, steps: int) -> str:
    """The service's last line: the critic trains, so it says how far; the reward and
    reference models are frozen, where "after 0 training steps" would read like a failure."""
    if name != "critic":
        return f"{name} service stopped"
    return f"{name} service stopped after {steps} training step{'' if steps == 1 else 's'}"


def main() -> int:
    missing = [name for name in (CONFIG_ENV, TOKEN_ENV) if not os.environ.get(name)]
    if missing:  # started by hand: the actor (orlhf ppo) starts its services with both set
        print(f"python -m ppo_baseline.serve: {' and '.join(missing)} not set: the PPO actor starts its services "
              "itself; run `orlhf ppo ...` (or `orlhf ppo serve=NAME` in a Slurm job of `orlhf launch`)",
              file=sys.stderr)
        return 2
    cfg = ServiceConfig.from_json(Path(os.environ[CONFIG_ENV]).read_text())
    code = run(cfg, read_token(os.environ[TOKEN_ENV]))
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(code)  # as offline_rlhf.cli does: gloo threads can abort interpreter teardown
    return code


if __name__ == "__main__":
    sys.exit(main())
