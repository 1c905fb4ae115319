"""`python -m ppo_baseline.serve` (or under torchrun): one PPO service process or world.

`orlhf ppo` starts it with two environment variables, never arguments (argv is visible to
every user of the machine): PPO_SERVICE_CONFIG names the service's JSON config
(run_dir/ppo/<name>/service.json) and PPO_TOKEN_FILE the 0600 file holding the shared
secret. The service is a stage of its own for the ledger (`ppo_<name>`): its row covers
the whole life of the process, idle time included. Once listening, rank 0 writes
`address.json` (url, pid) beside its config, which the launcher waits for.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from offline_rlhf.checkpoint import read_meta, resolve_checkpoint
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.runtime import stage_runtime
from ppo_baseline.config import ServiceConfig
from ppo_baseline.service import read_token
from ppo_baseline.services import build_service
from ppo_baseline.world import watch_parent

CONFIG_ENV = "PPO_SERVICE_CONFIG"
TOKEN_ENV = "PPO_TOKEN_FILE"
ADDRESS = "address.json"


def service_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "ppo" / name


def run(cfg: ServiceConfig, token: str) -> int:
    model_cfg = read_meta(resolve_checkpoint(cfg.settings.checkpoint, f"services.{cfg.name}.checkpoint")).model
    with stage_runtime(f"ppo_{cfg.name}", cfg.run_dir, cfg.settings.parallel, model_cfg, cfg) as (rt, usage):
        service = build_service(cfg, rt, token, usage)
        if rt.is_main:
            service.start()
            if cfg.parent_pid:
                watch_parent(service, cfg.parent_pid, cfg.parent_start_ticks)
            write_atomic(service_dir(cfg.run_dir, cfg.name) / ADDRESS,
                         json.dumps({"url": service.url, "pid": os.getpid()}))
            rt.log(f"{cfg.name} service ready on {service.url} ({rt.dims.world_size} process(es), "
                   f"TP={rt.dims.tp} x DP={rt.dims.dp})")
        try:
            service.run_world()
        finally:
            if rt.is_main:
                service.stop()
        rt.log(f"{cfg.name} service stopped after {service.step} training step(s)")
    return 0


def main() -> int:
    cfg = ServiceConfig.from_json(Path(os.environ[CONFIG_ENV]).read_text())
    code = run(cfg, read_token(os.environ[TOKEN_ENV]))
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(code)  # as offline_rlhf.cli does: gloo threads can abort interpreter teardown
    return code


if __name__ == "__main__":
    sys.exit(main())
