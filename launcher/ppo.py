"""The PPO stage on Slurm as one heterogeneous job: which modules share a component, how
many processes each runs per node, and the overrides that tell the actor where its
services are (`services.NAME.het_group`, read by ppo_baseline.launch).

Het group 0 is the actor's component (the batch script runs on its first node); then the
critic's, the reference's and the reward model's, unless `reference_with_actor` (the actor
starts the reference beside itself, as `orlhf ppo` does locally) or `reward_with_critic`
(both services run on the critic's nodes, sharing them) folds one into another. Slurm
gives each component nodes of its own.

GPUs: every step of a component sees all of its nodes' GPUs, and a process takes GPU
local rank (offline_rlhf.parallel.distributed.device_for). So the reward model beside the
critic starts GPU_OFFSET_ENV=<the critic's processes per node> (ppo_baseline.serve keeps
the GPUs from there on visible), the actor gives a reference beside it the GPUs after its
own (ppo_baseline.launch), and a node whose modules need more GPUs than `gpus_per_node`
is refused before queueing; `services.share_gpus=true` lets them share instead.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from launcher.schema import LaunchError, PPOComponents

PPO_STAGE = "ppo"
SERVICES = ("critic", "reference", "reward")  # ppo_baseline.config.SERVICES (not imported: no torch here)
TOKEN_FILE = "token"  # in the stage folder: the shared secret, 0600, never in the script
TOKEN_ENV = "PPO_TOKEN_FILE"  # ppo_baseline.serve.TOKEN_ENV
GPU_OFFSET_ENV = "PPO_GPU_OFFSET"  # ppo_baseline.serve.GPU_OFFSET_ENV


@dataclass(frozen=True)
class Module:
    name: str  # actor, critic, reference or reward
    procs_per_node: int
    # A module sharing its component's nodes with modules before it takes the GPUs after
    # theirs: its processes see the node's GPUs from this one on (GPU_OFFSET_ENV).
    gpu_offset: int = 0


@dataclass(frozen=True)
class Component:
    """One component of the heterogeneous job: `nodes` nodes for its modules' job steps."""

    group: int  # the het group: srun --het-group, SLURM_JOB_NODELIST_HET_GROUP_<group>
    nodes: int
    modules: tuple[Module, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(module.name for module in self.modules)


def placement(layout: PPOComponents) -> list[tuple[str, ...]]:
    """Module names per het group; a reference beside the actor is no job step of its own."""
    groups = [("actor",), ("critic", "reward") if layout.reward_with_critic else ("critic",)]
    if not layout.reference_with_actor:
        groups.append(("reference",))
    if not layout.reward_with_critic:
        groups.append(("reward",))
    return groups


def placement_overrides(layout: PPOComponents) -> list[str]:
    """Tell the actor which het group serves each remote service."""
    return [f"services.{name}.het_group={group}" for group, names in enumerate(placement(layout))
            for name in names if name in SERVICES]


def ppo_components(key: str, layout: PPOComponents, actor: Module, actor_nodes: int,
                   services: dict, gpus: int | None = None) -> tuple[Component, ...]:
    """`services` is the resolved config's `services` section (each service's `nproc`,
    `share_gpus`); `gpus`: the GPUs of a node (None: unknown, nothing checked). Modules
    sharing a component take consecutive GPUs of each node (`Module.gpu_offset`), unless
    services.share_gpus; a node's modules needing more GPUs than it has are refused."""
    nodes = {"critic": layout.critic_nodes, "reference": layout.reference_nodes, "reward": layout.reward_nodes}
    share = bool(services.get("share_gpus"))
    components = [Component(0, actor_nodes, (actor,))]
    for group, names in enumerate(placement(layout)[1:], 1):
        count = nodes[names[0]]  # a shared component has the nodes of its first module
        modules: list[Module] = []
        for name in names:
            nproc = _nproc(services, name)
            if nproc % count:
                raise LaunchError(f"{key}.ppo", f"services.{name}.nproc={nproc} does not split evenly over the "
                                  f"{count} node(s) of its component", f"set services.{name}.nproc or the node count")
            offset = 0 if share else sum(module.procs_per_node for module in modules)
            modules.append(Module(name, nproc // count, offset))
        components.append(Component(group, count, tuple(modules)))
    # The actor starts a reference beside itself (no het group) on its first node: GPUs after its own.
    beside = [Module("reference", _nproc(services, "reference"))] if layout.reference_with_actor else []
    for component in components:
        _check_gpus(key, [*component.modules, *(beside if component.group == 0 else [])], share, gpus)
    return tuple(components)


def _nproc(services: dict, name: str) -> int:
    return int((services.get(name) or {}).get("nproc", 1))


def _check_gpus(key: str, modules: list[Module], share: bool, gpus: int | None) -> None:
    """One GPU per process of a node's modules (with services.share_gpus: of its largest)."""
    sizes = [module.procs_per_node for module in modules]
    need = max(sizes) if share else sum(sizes)
    if gpus is None or need <= gpus:
        return
    what = " + ".join(f"{module.name} {module.procs_per_node}" for module in modules)
    raise LaunchError(f"{key}.ppo", f"the {what} process(es) of one node need {need} GPUs, one each, but a node "
                      f"has {gpus} (gpus_per_node)", "lower the entry's nproc or services.NAME.nproc, give the "
                      "component more nodes, place the modules apart (reward_with_critic, reference_with_actor: "
                      "false), or set services.share_gpus=true to let a node's modules share its GPUs")


def write_token(path: Path) -> None:
    """A fresh shared secret in `path`, 0600 from creation on, as offline_rlhf.http.write_token
    writes it (the launcher imports no offline_rlhf); each launch gets a new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    os.replace(temporary, path)


def prepare_stage_dir(plan_dir: Path, components: tuple[Component, ...]) -> None:
    """The token, and the folders the services' job steps write their logs to (srun opens
    them before the service starts)."""
    write_token(plan_dir / TOKEN_FILE)
    for component in components[1:]:
        for name in component.names:
            (plan_dir / name).mkdir(parents=True, exist_ok=True)
