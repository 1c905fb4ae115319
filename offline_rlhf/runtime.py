"""What every stage does around its work: find its processes and device, validate the
parallel layout, build the mesh, write its resolved config, and record its device-hours."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from offline_rlhf import ledger
from offline_rlhf.config.compose import to_yaml
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig, ParallelConfig
from offline_rlhf.host import claim_stage, open_stage, release_stage_lock, restore_stage, stage_outputs
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.parallel.distributed import (
    DistEnv,
    detect_env,
    init_distributed,
    long_wait_group,
    shutdown_distributed,
)
from offline_rlhf.parallel.parallelize import build_mesh
from offline_rlhf.stage_checks import check_sequence_length


@dataclass(frozen=True)
class Runtime:
    env: DistEnv
    device: torch.device
    dims: ParallelDims
    mesh: DeviceMesh | None
    stage_dir: Path
    group: dist.ProcessGroup | None = None  # the stage's whole world; None: one process (or the default group)
    waits: dist.ProcessGroup | None = None  # the same world, gloo, no timeout to speak of (`long_wait_group`)

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel rank (the TP ranks of one replica share it)."""
        return self.mesh.get_local_rank("dp") if self.mesh is not None else 0

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    @property
    def wait_group(self) -> dist.ProcessGroup | None:
        """Where to wait for the slowest rank's long work (`long_wait_group`; the stage's
        world where a test built none); on CPU tensors and objects."""
        return self.waits if self.waits is not None else self.group

    def barrier(self, poll: Callable[[], None] | None = None, every: float = 5.0) -> None:
        """Wait for every rank after work whose length differs between them by more than the
        process group's timeout (a replica's share of generation): on `wait_group`. `poll`
        (rank 0's ledger count, say) runs every `every` seconds meanwhile."""
        if self.group is None:
            return
        work = dist.barrier(group=self.wait_group, async_op=True)
        due = 0.0
        while poll is not None and not work.is_completed():
            if time.monotonic() >= due:
                poll()
                due = time.monotonic() + every
            time.sleep(0.05)
        work.wait()


@contextmanager
def stage_runtime(stage: str, run_dir: str, parallel: ParallelConfig, model: ModelConfig | None, config):
    """Yields (Runtime, ledger.Usage). The process group lives exactly as long as the block.
    `model` is the model the stage runs (an init checkpoint's, whatever `config.model` says)."""
    check_sequence_length(config, model)
    env = detect_env()
    device = init_distributed(env, timedelta(minutes=parallel.timeout_min))
    try:
        dims = ParallelDims.build(parallel, env.world_size, model)
        train = getattr(config, "train", None)
        if hasattr(train, "global_batch"):  # a training stage: say it before data and weights load
            dims.per_rank_batch(train.global_batch, train.micro_batch)
        stage_dir = Path(run_dir) / stage
        with _claimed(stage, stage_dir, env, device, config, model):
            runtime = Runtime(env=env, device=device, dims=dims, mesh=build_mesh(dims, device), stage_dir=stage_dir,
                              group=dist.group.WORLD if env.world_size > 1 else None,
                              waits=long_wait_group(env.world_size))
            with ledger.track(run_dir, stage, env, device) as usage:
                yield runtime, usage
    except SystemExit:  # every rank stops together (a signal stop): none may be killed while rank 0
        if env.world_size > 1:  # still writes its ledger row and releases the lock
            dist.barrier()
        raise
    finally:
        shutdown_distributed()


@contextmanager
def _claimed(stage: str, stage_dir: Path, env: DistEnv, device: torch.device, config, model: ModelConfig | None):
    """Rank 0 takes the stage's lock (two runs of one stage would interleave metrics, shards
    and ledger rows), then drops the old DONE before anything else changes, so a killed
    rerun never leaves DONE beside a new config.yaml. Every rank fails if the lock is taken.
    A rerun that fails or stops before it changed any output (a refused resume, a missing
    input, Ctrl-C during start-up) puts DONE and config.yaml back: the outputs stand, complete
    or not, as before."""
    lock, problem, earlier, outputs = None, None, None, None
    if env.is_main:
        try:
            lock, note = claim_stage(stage_dir, stage)
        except ConfigError as err:
            problem = err
    try:
        raise_everywhere(problem, device, "prepare the stage folder or take its lock")
        if lock is not None:
            outputs = stage_outputs(stage_dir)
            earlier = open_stage(stage_dir, note, config_text(config, model))
        yield
    except BaseException:
        if earlier is not None and stage_outputs(stage_dir) == outputs:
            restore_stage(stage_dir, earlier)
        raise
    finally:
        if lock is not None:
            release_stage_lock(lock)


def raise_everywhere(problem: Exception | None, device: torch.device, what: str, key: str = "run_dir",
                     group: dist.ProcessGroup | None = None) -> None:
    """A collective (of `group`: None, the default group) in place of a barrier after work
    rank 0 does alone: its `problem` fails every rank (the others would wait at the barrier
    for ever); theirs name `key` and say that rank 0 could not do `what`."""
    if any_rank(problem is not None, device, group) and problem is None:
        problem = ConfigError(key, f"rank 0 could not {what} (its message says why)")
    if problem is not None:
        raise problem


def any_rank(flag: bool, device: torch.device, group: dist.ProcessGroup | None = None) -> bool:
    """Whether `flag` is true on any rank of `group` (None: the default group, the stage's
    world); one process needs no collective."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return flag
    value = torch.tensor(int(flag), device=collective_device(group, device))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def collective_device(group: dist.ProcessGroup | None, device: torch.device | str) -> torch.device | str:
    """Where a tensor for a collective of `group` (None: the default group) must live: on
    the CPU for gloo (`Runtime.wait_group` is gloo on GPUs too), else on `device`."""
    return "cpu" if dist.get_backend(group) == "gloo" else device


# The fix `same_on_every_rank` names.
SAME_INPUTS = ("every rank must read the same inputs (a file rewritten while the ranks read it, or a node's stale copy "
               "of it, differs): make them agree and rerun")


def same_on_every_rank(rt: Runtime, value: dict[str, object], key: str, what: str, fix: str) -> None:
    """Every rank read the same inputs (`value`: their counts and digests): a file rewritten
    between the ranks' reads, or a node's stale copy, would have them work on other items
    (and, with other counts, wait at mismatched collectives for ever). Otherwise every rank
    fails with one line naming the ranks that differ from rank 0 and how."""
    if rt.group is None:
        return
    values: list = [None] * dist.get_world_size(rt.wait_group)
    dist.all_gather_object(values, value, group=rt.wait_group)  # each rank's reading may take its time
    differ = [rank for rank, theirs in enumerate(values) if theirs != values[0]]
    if differ:
        def said(seen: dict) -> str:
            return ", ".join(f"{name} {str(v)[:12]}" for name, v in seen.items())
        ranks = f"rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))}"
        raise ConfigError(key, f"{ranks} read other {what} than rank 0 (rank {differ[0]}: {said(values[differ[0]])}; "
                          f"rank 0: {said(values[0])})", fix)


def config_text(config, model: ModelConfig | None) -> str:
    """The config as composed (pipelines compare it with theirs to skip finished stages)
    and, when an init checkpoint overrides `model`, the model really run, as comments."""
    text = to_yaml(config)
    configured = getattr(config, "model", None)
    if model is None or configured is None or configured == model:
        return text
    lines = to_yaml(model).splitlines()
    return text + "# init.checkpoint fixes the architecture: `model` above is unused; this stage runs\n" + \
        "".join(f"#   {line}\n" for line in ["model:", *(f"  {line}" for line in lines)])


def autocast_for(device: torch.device):
    """bf16 compute with fp32 master weights on CUDA; plain fp32 on CPU. Without autocast's
    cache of weight casts: it keeps the bf16 copy of every weight until the context ends, so
    a forward over an FSDP model (whose weights are gathered one block at a time) would hold
    all of them at once, whether activations are recomputed or a whole dataset is scored
    inside one context; each weight is cast once per forward anyway."""
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
