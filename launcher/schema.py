"""The launcher's own structured config: `orlhf launch pipeline=NAME cluster=NAME [key=value ...]`.

`conf/pipeline/*.yaml` fills `pipeline`, `conf/cluster/*.yaml` fills `cluster`; Hydra merges
them into these dataclasses in struct mode, so a misspelt key is an error, not a no-op.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import MISSING

CONF_DIR = Path(__file__).resolve().parents[1] / "offline_rlhf" / "conf"  # offline_rlhf.config.compose.CONF_DIR
# Folders of the user's own configs (offline_rlhf.config.compose.CONFIG_DIR_FLAG): `orlhf`
# passes them to the launcher absolute, as `--config-dir=DIR`, and the launcher to each stage.
CONFIG_DIR_FLAG = "--config-dir"
LAUNCH_MODES = ("torchrun", "tasks")
# Set per process by torchrun (torchelastic: also TORCHELASTIC_*) or derived per job by the
# stages' rendezvous: exporting them in the job script would hide Slurm's own variables from
# the stage (and the SLURM_* ones its device-hour rows carry) or send it to another job's
# rendezvous. cluster.env may not set them, and the job script unsets those the submitting
# shell carries (sbatch exports its environment into the job).
PROCESS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                     "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE")
PROCESS_PREFIXES = ("SLURM_", "TORCHELASTIC_")
CLUSTER_KINDS = ("local", "slurm")
# Stages that never use a GPU: on a GPU cluster their Slurm jobs ask for none, so a dataset
# mix or a report neither waits for nor holds a whole GPU node (StageEntry.gpus_per_node).
CPU_STAGES = ("task", "mix", "report", "seeds-report", "judge")
# Stage names become folders under run_dir and parts of job names: no `/`, `..` or spaces.
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
# `#SBATCH` lines are comments to bash but sbatch splits them at spaces, quotes and `#`, and
# expands `%` in paths: no quoting suits both, so their values keep to these characters.
SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:+@=/-]+")
# Slurm's time formats (sbatch --time): minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
SLURM_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|(?i:unlimited|infinite)")
SIGNAL_LEAD_MAX_S = 65535  # sbatch --signal: "sig_time must be an integer between 0 and 65535"


# Paths Hydra's override grammar reads as one plain string; any other goes in its quotes.
PLAIN_PATH = re.compile(r"/[A-Za-z0-9_./+-]*")
# A stage config key as an override names it (`train.seed`).
CONFIG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# What a replicate's seed sets (`pipeline.seeds`, launcher.seeds): the training seed of the
# training stages (initialization, shuffling, the validation split: TrainConfig.seed; PPO's
# top-level `seed` also draws its prompts and seeds its services) and the sampling seed of the
# stages whose samples are trained on. The task data, label/mix/reference draws and the
# evaluation (its prompts and sampling seed) stay fixed: replicates differ in training only.
DEFAULT_SEED_KEYS = {"sft": ["train.seed"], "rm": ["train.seed"], "align": ["train.seed"],
                     "generate": ["generation.seed"], "ppo": ["seed", "generation.seed"]}


class LaunchError(ValueError):
    """A launch cannot go ahead. The message is one line naming the key (or stage) and the fix."""

    def __init__(self, key: str, problem: str, fix: str = ""):
        self.key = key
        super().__init__(f"{key}: {problem}" + (f"; {fix}" if fix else ""))


def check_printable(key: str, value: str) -> None:
    """Shell lines quote every value, but a line break would still end a `#` comment or a
    `#SBATCH` line early and start a command of its own."""
    bad = next((char for char in value if unicodedata.category(char) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise LaunchError(key, f"{value!r} contains the control character U+{ord(bad):04X}", "remove it")


def check_sbatch_value(key: str, value: str) -> None:
    if not SBATCH_VALUE.fullmatch(value):
        raise LaunchError(key, f"{value!r} cannot go on an #SBATCH line",
                          "use only ASCII letters, digits and _ . , : + @ = / -")


def check_time_limit(key: str, value: str) -> None:
    """sbatch accepts a malformed time only to fail the job when it is scheduled."""
    if not SLURM_TIME.fullmatch(value):
        raise LaunchError(key, f"{value!r} is not a Slurm time",
                          "use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 04:00:00, 2-00:00:00)")


def time_limit_seconds(value: str) -> int | None:
    """A valid Slurm time (SLURM_TIME) in seconds; None for unlimited. Without a day part,
    one field is minutes, two are MM:SS, three HH:MM:SS; with one, D-HH[:MM[:SS]]."""
    if value.lower() in ("unlimited", "infinite"):
        return None
    days, _, clock = value.rpartition("-")
    fields = [int(part) for part in clock.split(":")]
    if days:
        hours, minutes, seconds = fields + [0] * (3 - len(fields))
    else:
        hours, minutes, seconds = {1: [0, fields[0], 0], 2: [0, *fields], 3: fields}[len(fields)]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def check_signal_lead(key: str, time_limit: str | None, lead_s: int) -> None:
    """The warning must come after the job starts, or every attempt would stop after its
    first step (Slurm may also send it up to a minute early)."""
    limit = time_limit_seconds(time_limit) if time_limit else None
    if lead_s and limit is not None and lead_s >= limit:
        raise LaunchError(key, f"{time_limit} is not longer than cluster.signal_lead_s={lead_s} s, the time before "
                          "the limit at which training stages save and stop",
                          "give the stage more time or lower cluster.signal_lead_s")


def check_identifier(key: str, value: str) -> None:
    if not IDENTIFIER.fullmatch(value):
        raise LaunchError(key, f"{value!r} is not a name",
                          "use ASCII letters, digits, _ and -, starting with a letter or _")


@dataclass
class PPOComponents:
    """`stage: ppo` on Slurm: one heterogeneous-job component per PPO module. The actor's
    component has the entry's `nodes`; each service's processes are its `services.NAME.nproc`,
    spread evenly over its component's nodes."""

    critic_nodes: int = 1
    reference_nodes: int = 1
    reward_nodes: int = 1
    reward_with_critic: bool = False  # the reward model shares the critic's component (and nodes)
    reference_with_actor: bool = False  # the actor starts the reference beside itself, on its first node

    def check(self, key: str) -> None:
        for name in ("critic_nodes", "reference_nodes", "reward_nodes"):
            if getattr(self, name) < 1:
                raise LaunchError(f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclass
class StageEntry:
    """One step of a pipeline: `orlhf STAGE overrides...` on `nodes` nodes."""

    stage: str = MISSING  # the orlhf stage to run (`orlhf STAGE`)
    # The folder the stage writes under run_dir, which the stage decides (align: align_<method>);
    # when set, it must be that folder. None: whatever the stage writes.
    name: Optional[str] = None
    overrides: List[str] = field(default_factory=list)  # key=value for the stage's own config
    nodes: int = 1
    nproc: Optional[int] = None  # total processes; None: derived (see launcher.plan)
    time_limit: Optional[str] = None  # Slurm time format; None: cluster.time_limit
    # GPUs its Slurm job asks for per node; None: cluster.gpus_per_node, or none for a stage
    # that uses no GPU (CPU_STAGES); 0: none (a CPU job: not exclusive, in cluster.cpu_partition).
    gpus_per_node: Optional[int] = None
    ppo: PPOComponents = field(default_factory=PPOComponents)  # stage ppo only: its heterogeneous job
    repeat: bool = False  # part of the loop `pipeline.rounds` repeats (generate, label, mix/reference, align)

    @property
    def folder(self) -> str:
        return self.name or self.stage

    def overriding(self, values: dict) -> StageEntry:
        """This entry with `values` (key -> value) set after its own overrides, which win over
        them; an own override of one of those keys is dropped."""
        own = [override for override in self.overrides if override.split("=", 1)[0] not in values]
        return replace(self, overrides=[*own, *(f"{key}={value}" for key, value in values.items())])

    def check(self, key: str) -> None:
        """Every value here reaches a job script; `key` is the entry's place in the pipeline."""
        check_identifier(f"{key}.stage", self.stage)
        if self.name is not None:
            check_identifier(f"{key}.name", self.name)
        if self.time_limit is not None:
            check_time_limit(f"{key}.time_limit", self.time_limit)
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise LaunchError(f"{key}.gpus_per_node", f"must be >= 0, got {self.gpus_per_node}",
                              "0 runs the stage as a CPU job")
        for index, override in enumerate(self.overrides):
            check_printable(f"{key}.overrides[{index}]", override)
        self.ppo.check(f"{key}.ppo")


@dataclass
class PipelineConfig:
    name: str = MISSING
    stages: List[StageEntry] = field(default_factory=list)
    # Iterative rounds: the entries marked `repeat` run `rounds` times, round r > 1 in
    # run_dir/round_<r>/ with the previous round's aligned policy generating (launcher.rounds).
    rounds: int = 1
    # Training seeds: the whole pipeline once per seed, seed s in run_dir/seed_<s>/, then
    # `orlhf seeds-report` across them in run_dir (launcher.seeds). Empty: one run, in run_dir.
    seeds: List[int] = field(default_factory=list)
    # Stage kind -> the keys of its config a replicate's seed sets (after the entry's own overrides).
    seed_keys: Dict[str, List[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_SEED_KEYS.items()})

    def __post_init__(self):
        for index, entry in enumerate(self.stages):
            entry.check(f"pipeline.stages[{index}]")
        if self.rounds < 1:
            raise LaunchError("pipeline.rounds", f"must be >= 1, got {self.rounds}")
        self._check_seeds()

    def _check_seeds(self) -> None:
        if len(self.seeds) == 1:  # orlhf seeds-report would fail once the replicate has run
            raise LaunchError("pipeline.seeds", f"one seed ({self.seeds[0]}) has no spread across seeds to report",
                              "list at least two, or none for a single run in run_dir")
        for index, seed in enumerate(self.seeds):
            if seed < 0:
                raise LaunchError(f"pipeline.seeds[{index}]", f"must be >= 0, got {seed}")
            if seed in self.seeds[:index]:
                raise LaunchError(f"pipeline.seeds[{index}]", f"repeats seed {seed}", "list each seed once")
        known = sorted(path.stem for path in (CONF_DIR / "stage").glob("*.yaml"))
        for stage, keys in self.seed_keys.items():
            if stage not in known:
                raise LaunchError(f"pipeline.seed_keys.{stage}", "is not a stage", f"use one of {', '.join(known)}")
            for index, key in enumerate(keys):
                if not CONFIG_KEY.fullmatch(key):
                    raise LaunchError(f"pipeline.seed_keys.{stage}[{index}]", f"{key!r} is not a config key",
                                      "write a dotted key such as train.seed")


@dataclass
class ClusterConfig:
    """Where the stages run. Every optional Slurm setting left unset is left out of the script."""

    kind: str = "local"  # local (torchrun on this machine) or slurm (chained sbatch jobs)
    partition: Optional[str] = None
    # The partition of CPU jobs (stages that use no GPU: CPU_STAGES, an entry's gpus_per_node=0);
    # None: `partition`.
    cpu_partition: Optional[str] = None
    account: Optional[str] = None
    gpus_per_node: Optional[int] = None  # None: request no GPUs (CPU partitions, local Slurm)
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # per node, Slurm syntax: "0" (all of it), "500G"
    time_limit: Optional[str] = None  # Slurm syntax: "04:00:00", "2-00:00:00"
    exclusive: bool = False
    # torchrun: one task per node starting torchrun (c10d rendezvous at the first host);
    # tasks: one task per process, the stage reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID.
    launch_mode: str = "torchrun"
    container_image: Optional[str] = None  # pyxis/enroot image; None: run on the host
    container_mounts: List[str] = field(default_factory=list)  # "src:dst"; run_dir is always mounted
    env: Dict[str, str] = field(default_factory=dict)  # exported in every job script
    python: Optional[str] = None  # None: this interpreter on the host, "python" in a container
    # Jobs per stage. >1 turns on automatic continuation: later attempts wait (singleton) for
    # the previous one and resume from run_dir/<stage>/checkpoints/latest. Needs time_limit.
    max_attempts: int = 1
    # On Slurm: seconds before a job's time limit at which Slurm sends SIGUSR1 to the stage's
    # processes. A training stage (sft, rm, align) then saves a checkpoint at its next step
    # and exits with status 75 (the next attempt or a rerun resumes there); other stages
    # ignore it. Leave the time one step and one save need. 0: no signal.
    signal_lead_s: int = 120
    dry_run: bool = False  # render scripts and configs, submit or run nothing

    def __post_init__(self):
        if self.kind not in CLUSTER_KINDS:
            raise LaunchError("cluster.kind", f"unknown kind {self.kind!r}", f"use one of {', '.join(CLUSTER_KINDS)}")
        if self.launch_mode not in LAUNCH_MODES:
            raise LaunchError("cluster.launch_mode", f"unknown mode {self.launch_mode!r}",
                              f"use one of {', '.join(LAUNCH_MODES)}")
        for key in ("gpus_per_node", "cpus_per_task"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise LaunchError(f"cluster.{key}", f"must be >= 1, got {value}", "or leave it unset (null)")
        self._check_script_values()
        if self.max_attempts < 1:
            raise LaunchError("cluster.max_attempts", f"must be >= 1, got {self.max_attempts}")
        if self.max_attempts > 1 and not self.time_limit:
            raise LaunchError("cluster.max_attempts", "automatic continuation needs a time limit",
                              "set cluster.time_limit (e.g. 04:00:00)")
        if not 0 <= self.signal_lead_s <= SIGNAL_LEAD_MAX_S:
            raise LaunchError("cluster.signal_lead_s", f"must be in [0, {SIGNAL_LEAD_MAX_S}] seconds, got "
                              f"{self.signal_lead_s}", "0 sends no signal")
        check_signal_lead("cluster.time_limit", self.time_limit, self.signal_lead_s)

    def _check_script_values(self) -> None:
        for key in ("partition", "cpu_partition", "account", "mem"):
            if getattr(self, key) is not None:
                check_sbatch_value(f"cluster.{key}", getattr(self, key))
        if self.time_limit is not None:
            check_time_limit("cluster.time_limit", self.time_limit)
        for key in ("container_image", "python"):
            if getattr(self, key) is not None:
                check_printable(f"cluster.{key}", getattr(self, key))
        for index, mount in enumerate(self.container_mounts):
            check_printable(f"cluster.container_mounts[{index}]", mount)
            if "," in mount:
                raise LaunchError(f"cluster.container_mounts[{index}]", f"{mount!r} contains ','",
                                  "pyxis separates mounts with commas: give each mount its own list item")
        for name, value in self.env.items():
            self._check_env_name(name)
            check_printable(f"cluster.env.{name}", value)

    @staticmethod
    def _check_env_name(name: str) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise LaunchError(f"cluster.env.{name}", "is not a valid environment variable name")
        if name.startswith(PROCESS_PREFIXES) or name in PROCESS_VARIABLES:
            raise LaunchError(f"cluster.env.{name}", "is set by Slurm or torchrun for each process, or derived "
                              "per job", "remove it from cluster.env")


@dataclass
class LaunchConfig:
    run_dir: str = "runs/${pipeline.name}"
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self):
        check_printable("run_dir", self.run_dir)
        for index, entry in enumerate(self.pipeline.stages):
            check_signal_lead(f"pipeline.stages[{index}].time_limit", entry.time_limit, self.cluster.signal_lead_s)
