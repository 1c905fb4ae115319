"""The config of `orlhf ppo` (the actor and the launch of its three services) and of one
service process, built from the shared pieces of offline_rlhf.config.schema.

Defaults are the paper's PPO settings (Sec. 5): rollout batch 1024, minibatch 128, actor
lr 5e-7, critic lr 9e-6, one PPO epoch, KL coefficient 0.01, GAE lambda 0.95, gamma 1.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar, Optional, TypeVar

from offline_rlhf.config.base import (
    WEEK_S,
    Frozen,
    freeze,
    require,
    require_at_most,
    require_positive,
    require_run_dir,
    require_seed,
)
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.samples import PromptSourceConfig, check_prompt_mix
from offline_rlhf.config.schema import (
    GenerationConfig,
    InitConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    TemplateConfig,
)
from offline_rlhf.parallel.dims import ParallelDims

SERVICES = ("reward", "reference", "critic")
MAX_NPROC = 1024  # processes of one service's world (torchrun's --nproc-per-node, or over its het group's nodes)
# A DNS name (labels of letters, digits, '-' and '_', as Slurm node names may have): what can
# sit between `http://` and `:port` as it is; anything else (spaces, '/', '@') would change the URL.
HOST_NAME = re.compile(r"(?=.{1,253}$)(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*")
T = TypeVar("T")


def check_host(key: str, host: str) -> None:
    """`host` must be an IP literal (no IPv6 zone: its '%' would need escaping in a URL) or a host name."""
    if "%" in host or not (_is_ip(host) or HOST_NAME.fullmatch(host)):
        raise ConfigError(key, f"{host!r} is not a host name or IP address", "pass e.g. 127.0.0.1 or a node's name")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def refuse_layouts(parallel: ParallelConfig, keys: tuple[str, ...], prefix: str, module: str, why: str) -> None:
    """Each of `keys` (sequence_parallel, loss_parallel) of `parallel` must be off for PPO's `module`."""
    for key in keys:
        if getattr(parallel, key):
            raise ConfigError(f"{prefix}parallel.{key}", f"is not supported by the PPO {module} ({why})",
                              f"set {prefix}parallel.{key}=false")


def nested(prefix: str, check: Callable[[], T]) -> T:
    """Run `check`, written for a shared config piece at the top level (parallel.tp, optim.lr:
    the actor's keys), for a copy of it under `prefix`: its error names the full key, and so
    do the other keys of that piece its message mentions."""
    try:
        return check()
    except ConfigError as error:
        section = re.escape(error.key.split(".")[0])
        message = re.sub(rf"(?<![\w.]){section}\.", f"{prefix}{error.key.split('.')[0]}.", str(error))
        raise ConfigError(f"{prefix}{error.key}", message.removeprefix(f"{prefix}{error.key}: ")) from None


@dataclass
class PPOAlgorithmConfig(Frozen):
    """The PPO loop: sizes in sequences (one sampled response per prompt)."""

    iterations: int = 100  # rollout + update rounds
    rollout_batch: int = 1024  # prompts (= responses) per iteration
    minibatch: int = 128  # responses per optimizer step (actor and critic)
    micro_batch: int = 8  # responses per forward/backward
    epochs: int = 1  # PPO epochs over each rollout batch
    kl_coef: float = 0.01  # weight of the per-token KL penalty against the initial policy
    gamma: float = 1.0  # discount of future rewards
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # PPO's policy-ratio clip range
    value_clip: float = 0.2  # the critic's value clip range
    whiten_advantages: bool = True  # normalize advantages to zero mean, unit variance per batch
    # policy steps, or critic steps, skipped (non-finite loss or gradient norm) beyond this share of the run fail it
    max_skipped_fraction: float = 0.5

    def __post_init__(self):
        require_positive(self, "iterations", "rollout_batch", "minibatch", "micro_batch", "epochs", prefix="ppo.")
        if self.rollout_batch % self.minibatch:
            raise ConfigError("ppo.minibatch", f"{self.minibatch} does not divide ppo.rollout_batch="
                              f"{self.rollout_batch}", "choose a divisor")
        if self.minibatch % self.micro_batch:
            raise ConfigError("ppo.micro_batch", f"{self.micro_batch} does not divide ppo.minibatch={self.minibatch}",
                              "choose a divisor")
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:  # NaN fails it too
                raise ConfigError(f"ppo.{key}", f"must be in [0, 1], got {getattr(self, key)}")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ConfigError("ppo.max_skipped_fraction", f"must be in [0, 1], got {self.max_skipped_fraction}")
        if self.kl_coef < 0:
            raise ConfigError("ppo.kl_coef", f"must be >= 0, got {self.kl_coef}")
        require_positive(self, "clip", "value_clip", prefix="ppo.")

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, the actor's and the critic's alike (their schedules' length)."""
        return self.iterations * self.epochs * (self.rollout_batch // self.minibatch)

    def check_split(self, dp: int, module: str, key: str, fix: str) -> None:
        """Every data-parallel rank of `module` takes an equal share of each minibatch, in
        whole micro-batches (FSDP gathers weights collectively: all ranks run the same forwards).
        `key`: what the error names, the setting that gave `dp`."""
        if self.minibatch % (dp * self.micro_batch):
            raise ConfigError(key, f"the {module}'s minibatch of {self.minibatch} does not split into "
                              f"micro-batches of {self.micro_batch} on {dp} data-parallel ranks",
                              f"make ppo.minibatch a multiple of ppo.micro_batch x {fix}")


# A service's parallel and optim sections are checked by ServiceSettings.check, under their
# full keys (services.critic.parallel.tp): OmegaConf builds a nested config before the one
# holding it, so their own __post_init__ could only name the actor's keys (parallel.tp).


@dataclass
class ServiceParallelConfig(ParallelConfig):
    def __post_init__(self):
        pass


@dataclass
class ServiceOptimConfig(OptimConfig):
    def __post_init__(self):
        pass


def critic_optim() -> ServiceOptimConfig:
    """The critic's optimizer by default (paper: lr 9e-6, constant); the only service that trains."""
    return ServiceOptimConfig(lr=9e-6, schedule="constant")


@dataclass
class ServiceSettings(Frozen):
    """One service: its checkpoint, its own world (`nproc` processes under torchrun, split
    by `parallel`), and what it answers per forward. Checked by `check` (by PPOConfig and
    ServiceConfig), which knows the service's name."""

    checkpoint: str = ""  # the module's weights (SFT checkpoint for reference/critic, RM for reward)
    nproc: int = 1  # processes of the module's world (TP x DP)
    parallel: ServiceParallelConfig = field(default_factory=ServiceParallelConfig)
    batch_size: int = 16  # sequences per forward
    # critic only (the reward model and the reference only answer forwards: set elsewhere, refused)
    optim: ServiceOptimConfig = field(default_factory=critic_optim)
    # Set by `orlhf launch` on Slurm: the heterogeneous-job component serving it (the actor
    # then finds it there instead of starting it). None: the actor starts it on its node.
    het_group: Optional[int] = None

    def check(self, name: str, ppo: PPOAlgorithmConfig) -> None:
        """What the config alone decides of service `name`, every error under services.NAME.:
        its world's split (ParallelDims, as torchrun would get it), an optimizer setting
        only for the critic (the one service that trains) and, for the critic, that each of
        its data-parallel ranks takes whole micro-batches of every minibatch."""
        prefix = f"services.{name}."
        require_positive(self, "nproc", "batch_size", prefix=prefix)
        require_at_most(self, MAX_NPROC, "nproc", prefix=prefix, fix="processes of one service, over all its nodes")
        if self.het_group is not None and self.het_group < 1:
            raise ConfigError(f"{prefix}het_group", f"must be >= 1 (group 0 is the actor's), got {self.het_group}")
        nested(prefix, lambda: OptimConfig.__post_init__(self.optim))
        if name != "critic":
            default = asdict(critic_optim())
            changed = [key for key, value in asdict(self.optim).items() if value != default[key]]
            if changed:
                raise ConfigError(f"{prefix}optim.{changed[0]}", f"is not used: only the critic trains, the "
                                  f"{name} service only answers forwards", f"remove {prefix}optim.{changed[0]}")
        nested(prefix, lambda: ParallelConfig.__post_init__(self.parallel))
        dims = nested(prefix, lambda: ParallelDims.build(self.parallel, self.nproc))
        if name == "critic":  # the reward model pads rows for SP; the reference is a TP-only replica
            refuse_layouts(self.parallel, ("sequence_parallel",), prefix, name, "rollout rows have any length; "
                           "sequence parallelism splits every row evenly over the TP ranks")
            ppo.check_split(dims.dp, name, f"{prefix}nproc", f"the critic's data-parallel size ({prefix}nproc / "
                            f"{prefix}parallel.tp)")


@dataclass
class ServicesConfig(Frozen):
    reward: ServiceSettings = field(default_factory=lambda: ServiceSettings(checkpoint="runs/default/rm/checkpoints"))
    reference: ServiceSettings = field(
        default_factory=lambda: ServiceSettings(checkpoint="runs/default/sft/checkpoints"))
    critic: ServiceSettings = field(default_factory=lambda: ServiceSettings(checkpoint="runs/default/rm/checkpoints"))
    host: str = "127.0.0.1"  # the address services bind and the actor calls
    startup_timeout_s: float = 300.0  # how long the actor waits for every service's health check
    request_timeout_s: float = 600.0  # how long one call to a service may take
    max_body_mb: int = 256  # largest request body a service accepts
    # Services the actor starts on its node get GPUs of their own, after the actor's
    # (ppo_baseline.launch.service_gpus); true: they run on the actor's GPUs instead (small
    # models, a one-GPU machine), the ledger then counting those GPUs once per module.
    share_gpus: bool = False

    def __post_init__(self):
        require_positive(self, "startup_timeout_s", "request_timeout_s", "max_body_mb", prefix="services.")
        require_at_most(self, WEEK_S, "startup_timeout_s", "request_timeout_s", prefix="services.",
                        fix="seconds: at most a week")
        check_host("services.host", self.host)


@dataclass
class PPOConfig(Frozen):
    """`orlhf ppo`: the PPO baseline as the paper ran it, four modules. The actor (this
    process, `init.checkpoint`, the SFT model) samples responses, asks the reward model,
    the reference (initial) policy and the critic (three services over HTTP, each its own
    process group) for rewards, log-probs and values, and trains with clipped PPO; the
    critic trains on its own. Outputs in run_dir/ppo/."""

    run_dir: str = "runs/default"  # the run folder; outputs go to run_dir/ppo/
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-7, schedule="constant"))
    ppo: PPOAlgorithmConfig = field(default_factory=PPOAlgorithmConfig)
    services: ServicesConfig = field(default_factory=ServicesConfig)
    # prompt sources for rollouts (as `orlhf generate`'s)
    sources: list[PromptSourceConfig] = field(default_factory=list)
    total_prompts: Optional[int] = None  # prompts drawn from the mix; null: all
    # init.checkpoint's recorded template wins; this applies when it records none (another: an error)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    max_prompt_tokens: int = 512  # longer prompts lose their oldest exchanges, then their first tokens
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(greedy=False,
                                                                                   max_new_tokens=128))
    seed: int = 1234  # seeds prompt sampling and rollouts
    save_every: int = 10  # iterations
    keep_last: int = 2  # actor checkpoints kept on disk
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Set by `orlhf launch` for a service's job step: run this process as that service
    # (reward, reference or critic) of the Slurm heterogeneous job. "": the actor.
    serve: str = ""
    # The head each checkpoint key's model must have (`orlhf launch` checks before queueing).
    checkpoint_heads: ClassVar[dict[str, str]] = {
        "init.checkpoint": "lm", "services.reference.checkpoint": "lm", "services.reward.checkpoint": "value",
        "services.critic.checkpoint": "value"}

    def __post_init__(self):
        require_run_dir(self)
        require(self.init, "checkpoint", prefix="init.", fix="pass the SFT checkpoint the actor starts from")
        if self.serve and (self.serve not in SERVICES or getattr(self.services, self.serve).het_group is None):
            raise ConfigError("serve", f"{self.serve!r} is not a service placed in a het group",
                              f"use one of {', '.join(SERVICES)} with services.NAME.het_group set (orlhf launch does)")
        check_prompt_mix(self)
        require_seed(self)
        if self.generation.greedy:
            raise ConfigError("generation.greedy", "PPO samples its rollouts", "set generation.greedy=false")
        if self.generation.n != 1:
            raise ConfigError("generation.n", "PPO draws one response per prompt", "set generation.n=1")
        if self.generation.stop:  # a response ends at an end-of-turn token; a cut one would keep the string
            raise ConfigError("generation.stop", "PPO rollouts end at EOS or max_new_tokens only",
                              "remove generation.stop")
        # The ratio and the KL use the policy's log-probs at temperature 1 over the whole
        # vocabulary: rollouts must be drawn from that same distribution.
        for key, plain in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0)):
            if getattr(self.generation, key) != plain:
                raise ConfigError(f"generation.{key}", "PPO samples from the policy itself, whose log-probs "
                                  "(temperature 1, whole vocabulary) feed its ratio and KL",
                                  f"set generation.{key}={plain:g}")
        for name in SERVICES:
            require(getattr(self.services, name), "checkpoint", prefix=f"services.{name}.")
            getattr(self.services, name).check(name, self.ppo)
        require_positive(self, "save_every", "keep_last", "max_prompt_tokens")
        self.check_world()

    def check_world(self, dp: int | None = None) -> None:
        """What the actor's layout supports: DP (fsdp or ddp) x TP. Sequence and loss
        parallelism are refused: rollout rows have any length (SP splits sequences evenly)
        and the entropy metric needs whole (not vocabulary-sharded) logits. `dp`: the
        data-parallel size once the world is known (default: an explicit parallel.dp)."""
        refuse_layouts(self.parallel, ("sequence_parallel", "loss_parallel"), "", "actor",
                       "rollout rows have any length; its entropy metric needs whole logits")
        dp = self.parallel.dp if dp is None else dp
        if dp > 0:
            self.ppo.check_split(dp, "actor", "ppo.micro_batch", "the actor's data-parallel size")


@dataclass
class ServiceConfig(Frozen):
    """What one service process runs, written by `orlhf ppo` into run_dir/ppo/<name>/ as
    JSON (read by `python -m ppo_baseline.serve`)."""

    name: str = "critic"
    run_dir: str = "runs/default"
    settings: ServiceSettings = field(default_factory=ServiceSettings)
    ppo: PPOAlgorithmConfig = field(default_factory=PPOAlgorithmConfig)
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (published in address.json)
    max_body_mb: int = 256
    parent_pid: int = 0  # the actor: the service exits once it is gone (0: no watch)
    parent_start_ticks: Optional[int] = None
    seed: int = 1234
    keep_last: int = 2

    def __post_init__(self):
        if self.name not in SERVICES:
            raise ConfigError("name", f"unknown service {self.name!r}", f"use one of {', '.join(SERVICES)}")
        self.settings.check(self.name, self.ppo)
        check_host("services.host", self.host)
        require_seed(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ServiceConfig:
        raw = json.loads(text)
        settings = dict(raw.pop("settings"))
        settings = ServiceSettings(parallel=ServiceParallelConfig(**settings.pop("parallel")),
                                   optim=ServiceOptimConfig(**settings.pop("optim")), **settings)
        return freeze(cls(settings=settings, ppo=PPOAlgorithmConfig(**raw.pop("ppo")), **raw))
