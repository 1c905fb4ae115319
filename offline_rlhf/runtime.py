"""What every stage does around its work: find its processes and device, validate the
parallel layout, build the mesh, write its resolved config, and record its device-hours."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from offline_rlhf import ledger
from offline_rlhf.config.compose import to_yaml
from offline_rlhf.config.schema import ModelConfig, ParallelConfig
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.parallel.distributed import DistEnv, detect_env, init_distributed, shutdown_distributed
from offline_rlhf.parallel.parallelize import build_mesh


@dataclass(frozen=True)
class Runtime:
    env: DistEnv
    device: torch.device
    dims: ParallelDims
    mesh: DeviceMesh | None
    stage_dir: Path
    group: dist.ProcessGroup | None = None  # the stage's whole world; None: one process (or the default group)

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)


@contextmanager
def stage_runtime(stage: str, run_dir: str, parallel: ParallelConfig, model: ModelConfig | None, config):
    """Yields (Runtime, ledger.Usage). The process group lives exactly as long as the block."""
    env = detect_env()
    device = init_distributed(env)
    try:
        dims = ParallelDims.build(parallel, env.world_size, model)
        stage_dir = Path(run_dir) / stage
        if env.is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            (stage_dir / "config.yaml").write_text(to_yaml(config))
        runtime = Runtime(env=env, device=device, dims=dims, mesh=build_mesh(dims, device), stage_dir=stage_dir,
                          group=dist.group.WORLD if env.world_size > 1 else None)
        with ledger.track(run_dir, stage, env, device) as usage:
            yield runtime, usage
    finally:
        shutdown_distributed()


def autocast_for(device: torch.device):
    """bf16 compute with fp32 master weights on CUDA; plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
