"""From a composed `LaunchConfig` to one `StagePlan` per pipeline entry.

Each stage's overrides are validated by the stage itself (`orlhf STAGE ... --cfg` in a
subprocess, so the launcher imports neither torch nor offline_rlhf); the resolved YAML it
prints is the `config.yaml` written beside the job script, and its `parallel` section gives
the process count. Then `orlhf STAGE ... --check` validates it for that process count (layout,
batch split, tokenizer) and lists its input paths: each must exist or lie in the folder of an
earlier stage. Every stage is checked before anything runs or is submitted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import yaml
from hydra.core.override_parser.types import Quote, QuotedString

from launcher.ppo import PPO_STAGE, Component, Module, placement_overrides, ppo_components
from launcher.rounds import Step
from launcher.schema import (
    CONFIG_DIR_FLAG,
    CPU_STAGES,
    PLAIN_PATH,
    ClusterConfig,
    LaunchConfig,
    LaunchError,
    StageEntry,
    check_sbatch_value,
)
from launcher.seeds import first_run, sweep_steps

STAGE_MODULE = "offline_rlhf.cli"
PPO_ACTOR_FOLDER = "ppo_actor"  # ppo_baseline.stage.STAGE
# A Hugging Face repo id as the stages take one (offline_rlhf.hub.parse_repo_id; not imported: no torch here).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
CHECK_WORLD_SIZE = "ORLHF_CHECK_WORLD_SIZE"  # offline_rlhf.cli.CHECK_WORLD_SIZE (not imported: no torch here)


@dataclass(frozen=True)
class StagePlan:
    """Everything needed to run or render one stage; paths are absolute."""

    name: str  # the folder the stage writes (a later round's: round_<r>.<folder>); part of the job name
    stage: str  # `orlhf STAGE`
    args: tuple[str, ...]  # the stage's key=value arguments, run_dir included
    nodes: int
    procs_per_node: int
    stage_dir: Path
    config_yaml: str  # the stage's resolved config, as `--cfg` printed it
    time_limit: str | None
    components: tuple[Component, ...] = ()  # the PPO stage on Slurm: its heterogeneous job (launcher.ppo)
    chain: str = ""  # the replicate (seed_<s>) whose chain it is part of; "": the run's own (`waits_for`)
    reads: tuple[Path, ...] = ()  # the absolute input paths `--check` listed (`waits_for`)
    gpus_per_node: int | None = None  # its Slurm job's GPUs per node; None: cluster.gpus_per_node
    cpu_only: bool = False  # a Slurm job asking for no GPU: not exclusive, in cluster.cpu_partition

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def config_file(self) -> Path:
        """The resolved config the stage itself writes when it runs (the launcher never does):
        in its folder, except PPO's, in its actor's runtime folder (ppo_baseline.stage.STAGE)."""
        folder = PPO_ACTOR_FOLDER if self.stage == PPO_STAGE else self.stage_dir.name
        return self.stage_dir.parent / folder / "config.yaml"


def resolved_run_dir(cfg: LaunchConfig) -> Path:
    """Absolute, because jobs start in other directories and on other hosts."""
    return Path(cfg.run_dir).expanduser().resolve()


def plan_pipeline(cfg: LaunchConfig, config_dirs: Sequence[str] = ()) -> list[StagePlan]:
    """Each entry is planned once as written (with seeds, in the first replicate); the folders
    its stage writes then name the entries, and the other steps (later rounds, the other
    replicates: launcher.seeds) are planned from those. `config_dirs`, the user's config
    folders (absolute), go to every stage as `--config-dir=DIR`."""
    run_dir = resolved_run_dir(cfg)
    if cfg.cluster.kind == "slurm":
        check_slurm_run_dir(run_dir, cfg.cluster)
        if cfg.cluster.container_image:  # the stages compose their configs in the container
            for folder in config_dirs:
                check_container_path(CONFIG_DIR_FLAG, {"path": folder}, cfg.cluster, run_dir)
    flags = tuple(f"{CONFIG_DIR_FLAG}={folder}" for folder in config_dirs)
    if not cfg.pipeline.stages:
        raise LaunchError("pipeline.stages", "is empty",
                          f"list at least one stage in the pipeline's file (pipeline/{cfg.pipeline.name}.yaml)")
    first, first_dir = first_run(cfg.pipeline, run_dir)
    as_written = [Step(index, entry, first_dir, entry.folder) for index, entry in enumerate(first.stages)]
    with ThreadPoolExecutor(max_workers=min(8, len(as_written))) as pool:
        written = list(pool.map(lambda step: _plan_stage(step, cfg.cluster, flags), as_written))
        _check_unique_folders(written)
        pipeline = replace(cfg.pipeline, stages=[replace(e, name=p.name) for e, p in zip(cfg.pipeline.stages, written)])
        steps = sweep_steps(pipeline, run_dir)
        known = {_identity(step): plan for step, plan in zip(as_written, written)}
        fresh = iter(pool.map(lambda step: _plan_stage(step, cfg.cluster, flags),
                              [step for step in steps if _identity(step) not in known]))
        plans = [replace(known[_identity(step)], name=step.name, chain=step.chain) if _identity(step) in known
                 else next(fresh) for step in steps]
        inputs = list(pool.map(lambda pair: check_stage(pair[0].key, pair[1]), zip(steps, plans)))
    check_inputs(plans, inputs, [step.key for step in steps], cfg.cluster, run_dir)
    return [replace(plan, reads=tuple(_input_path(item) for item in needed)) for plan, needed in zip(plans, inputs)]


def _input_path(item: dict) -> Path:
    """An input `--check` listed, as the launcher compares it with stage folders: relative
    paths are as the stages see them, from here."""
    return Path(item["path"]).expanduser().absolute()


def _identity(step: Step) -> tuple:
    """What a stage's plan follows from, its name aside."""
    return step.index, step.run_dir, tuple(step.entry.overrides)


def waits_for(plans: list[StagePlan]) -> list[list[int]]:
    """The positions of the plans each plan waits for: the earlier stages whose folders hold
    what it reads (`StagePlan.reads`), so stages that do not read each other's outputs run side
    by side (the alignment methods after `mix`, PPO beside them, `rm` beside `generate`). A
    stage that reads no earlier stage's folder but has earlier stages (`report`, which reads
    the whole run; `seeds-report`) waits for all of them. Earlier means of its replicate's
    chain (launcher.seeds), or any for a stage of the run's own. A wait already implied by
    another (it waits for it in turn) is left out: a straight chain waits for the one before."""
    ancestors: list[set[int]] = []
    waits = []
    for position, plan in enumerate(plans):
        earlier = [p for p in range(position) if not plan.chain or plans[p].chain == plan.chain]
        reading = [p for p in earlier if any(path.is_relative_to(plans[p].stage_dir) for path in plan.reads)]
        direct = reading or earlier
        implied = set().union(*(ancestors[p] for p in direct))
        waits.append([p for p in direct if p not in implied])
        ancestors.append(implied | set(direct))
    return waits


def waits_among(plans: list[StagePlan], runs: list[bool]) -> list[list[int]]:
    """`waits_for` of the plans that run, as positions among them. A stage that does not run
    is complete and so is all it waits for (a stage waiting for one that runs, runs:
    launcher.local.stages_to_run), so no wait is lost."""
    among = {position: index for index, position in enumerate(p for p, run in enumerate(runs) if run)}
    return [[among[p] for p in waits if runs[p]] for waits, run in zip(waits_for(plans), runs) if run]


def stage_folder(stage: str, resolved: dict) -> str:
    """The folder under run_dir that a stage writes its outputs and DONE to. The stages decide
    (offline_rlhf.config.training.AlignConfig.stage_name, offline_rlhf.stages.rm.EVAL_STAGE,
    offline_rlhf.stages.rm_score.STAGE, ppo_baseline.stage.OUT); not imported (no torch here),
    tests/unit/launcher/test_launch_review.py keeps them equal."""
    if stage == "align":
        return f"align_{resolved['method']}"
    if stage == "rm" and resolved.get("eval_only"):
        return "rm_eval"
    return {"rm-score": "rm_score"}.get(stage, stage)


def check_slurm_run_dir(run_dir: Path, cluster: ClusterConfig) -> None:
    """Job output paths under run_dir go on #SBATCH lines; a container mounts it as `dir:dir`
    in a comma-separated list."""
    check_sbatch_value("run_dir", str(run_dir))
    if cluster.container_image and any(char in str(run_dir) for char in ",:"):
        raise LaunchError("run_dir", f"{str(run_dir)!r} contains ',' or ':', which pyxis reads in its mount list",
                          "choose a path without them")


def run_dir_override(run_dir: Path) -> str:
    """`run_dir=...` as Hydra reads it back: unquoted, `,` would make a sweep and spaces,
    quotes or non-ASCII a syntax error. Quoted, `${` would still be an interpolation."""
    text = str(run_dir)
    if "${" in text:
        raise LaunchError("run_dir", f"{text!r} contains '${{', which the stages would resolve as an interpolation",
                          "choose a path without it")
    if PLAIN_PATH.fullmatch(text):
        return f"run_dir={text}"
    return "run_dir=" + QuotedString(text=text, quote=Quote.double).with_quotes()


def _check_unique_folders(plans: list[StagePlan]) -> None:
    """Two entries writing one folder would overwrite each other's outputs."""
    seen: dict[str, int] = {}
    for index, plan in enumerate(plans):
        if plan.name in seen:
            raise LaunchError(f"pipeline.stages[{index}]",
                              f"writes run_dir/{plan.name}, as stages[{seen[plan.name]}] does",
                              "run the stage once, or change what decides its folder (align: method)")
        seen[plan.name] = index


def _plan_stage(step: Step, cluster: ClusterConfig, flags: tuple[str, ...]) -> StagePlan:
    entry, run_dir, key = step.entry, step.run_dir, step.key
    if any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in entry.overrides):
        raise LaunchError(f"{key}.overrides", "run_dir is set by the launcher", "pass run_dir=... to orlhf launch")
    hetjob = entry.stage == PPO_STAGE and cluster.kind == "slurm"
    placement = placement_overrides(entry.ppo) if hetjob else []
    args = (*flags, *entry.overrides, *placement, run_dir_override(run_dir))
    config_yaml = resolve_stage_config(key, entry.stage, args)
    resolved = yaml.safe_load(config_yaml)
    cpu_only = entry.gpus_per_node == 0 or (entry.gpus_per_node is None and entry.stage in CPU_STAGES)
    gpus = job_gpus(cpu_only, entry.gpus_per_node, cluster)
    nodes, per_node = _process_layout(key, entry, resolved.get("parallel") or {}, cluster.kind, gpus)
    _check_node_cpus(key, entry.stage, per_node, cluster)
    components = ppo_components(key, entry.ppo, Module("actor", per_node), nodes,
                                resolved.get("services") or {}, gpus) if hetjob else ()
    folder = stage_folder(entry.stage, resolved)
    if entry.name is not None and entry.name != folder:
        raise LaunchError(f"{key}.name", f"{entry.name!r} is not the folder the stage writes, run_dir/{folder}",
                          f"set name: {folder} or remove it")
    name = step.name if entry.name is not None else folder  # a later round's step is named by then
    return StagePlan(name=name, stage=entry.stage, args=args, nodes=nodes, procs_per_node=per_node,
                     stage_dir=run_dir / folder, config_yaml=config_yaml,
                     time_limit=entry.time_limit or cluster.time_limit, components=components, chain=step.chain,
                     gpus_per_node=entry.gpus_per_node or None, cpu_only=cpu_only)


def job_gpus(cpu_only: bool, gpus_per_node: int | None, cluster: ClusterConfig) -> int | None:
    """The GPUs per node a stage's Slurm job asks for: none for a CPU job, else its entry's
    (`gpus_per_node`) or the cluster's."""
    return None if cpu_only else gpus_per_node or cluster.gpus_per_node


def resolve_stage_config(key: str, stage: str, args: tuple[str, ...]) -> str:
    """The stage's own validation: exit 2 and one `orlhf STAGE: error: ...` line when wrong."""
    proc = subprocess.run([sys.executable, "-m", STAGE_MODULE, stage, *args, "--cfg"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(f"{key} ({stage})", _failure(proc))
    return proc.stdout


def _failure(proc: subprocess.CompletedProcess) -> str:
    """What a stage's `--cfg` or `--check` said when it failed: its one error line, or the
    last line of a traceback (the exception), not the traceback's first."""
    lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def check_stage(key: str, plan: StagePlan) -> list[dict]:
    """`orlhf STAGE ... --check` with the process count the stage will get: what `--cfg`
    cannot see (the layout against the world size and the model, the global batch split, a
    tokenizer). Returns the input paths the stage reported ({key, path, exists})."""
    env = {**os.environ, CHECK_WORLD_SIZE: str(plan.world_size)}
    proc = subprocess.run([sys.executable, "-m", STAGE_MODULE, plan.stage, *plan.args, "--check"],
                          capture_output=True, text=True, env=env)
    key = f"{key} ({plan.stage}, nproc={plan.world_size})"
    if proc.returncode != 0:
        raise LaunchError(key, _failure(proc))
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])["inputs"]
    except (IndexError, KeyError, ValueError):
        raise LaunchError(key, f"`--check` printed no input list: {proc.stdout.strip()[:200]!r}") from None


def check_inputs(plans: list[StagePlan], inputs: list[list[dict]], keys: list[str], cluster: ClusterConfig,
                 run_dir: Path) -> None:
    """Every input a stage reads exists now, or lies in the folder of a stage it runs after
    (an earlier stage of its replicate's chain, or of the run's own), which writes it first;
    relative paths are as the stages see them, from here. In a container every input must
    also be visible (`check_container_path`), and a checkpoint an earlier stage writes must
    hold the head its reader needs (`check_written_head`). `keys`: what errors name for each plan."""
    for position, (plan, needed) in enumerate(zip(plans, inputs)):
        for item in needed:
            key = f"{keys[position]} ({plan.name}) {item['key']}"
            if cluster.kind == "slurm" and cluster.container_image:
                check_container_path(key, item, cluster, run_dir)
            path = _input_path(item)
            writer = next((p for p in reversed(plans[:position]) if path.is_relative_to(p.stage_dir)
                           and (not plan.chain or p.chain == plan.chain)), None)
            if writer is not None:
                check_written_head(key, item, path, writer)
            if item["exists"] or path.exists() or writer is not None:
                continue
            written_later = next((p.name for p in plans[position + 1:] if path.is_relative_to(p.stage_dir)), None)
            raise LaunchError(key, f"{item['path']} does not exist" + (
                                  f" yet: stage {written_later!r} writes it, but runs later" if written_later
                                  else " and no earlier stage of the pipeline writes it"),
                              "fix the path, or run the stage that writes it first")


# The head of the models each training stage saves (offline_rlhf.stages; not imported: no torch here).
SAVED_HEADS = {"sft": "lm", "align": "lm", "rm": "value", PPO_STAGE: "lm"}
# offline_rlhf.train.init.HEAD_NAMES, which the stages' messages use (a test keeps the two equal).
HEAD_NAMES = {"lm": "a language model (lm head)", "value": "a reward model (value head)"}


def check_written_head(key: str, item: dict, path: Path, writer: StagePlan) -> None:
    """A checkpoint an earlier stage writes holds the head the reading key needs (`--check`
    checked those that exist): a reward model where a language model is read (or the reverse)
    would fail the reading stage only after every stage before it has run. PPO's critic,
    under ppo/critic/, is a reward model."""
    saved = "value" if writer.stage == PPO_STAGE and path.is_relative_to(writer.stage_dir / "critic") \
        else SAVED_HEADS.get(writer.stage)
    wanted = item.get("head")
    if saved is not None and wanted is not None and saved != wanted:
        raise LaunchError(key, f"{item['path']} is written by stage {writer.name!r}, which saves "
                          f"{HEAD_NAMES[saved]}; this needs {HEAD_NAMES[wanted]}",
                          "point it at a stage that saves one (sft or align: a language model; rm: a reward model)")


def check_container_path(key: str, item: dict, cluster: ClusterConfig, run_dir: Path) -> None:
    """A stage in a container (pyxis) sees the image, run_dir (mounted at its own path) and
    each `cluster.container_mounts` item SRC:DST at DST; it starts in the image's working
    directory. So an input must be an absolute path under run_dir or under a mount whose
    DST is its SRC (the launcher checks the path here, the stage opens it there). A Hugging
    Face repo id (org/name, nothing of that name here) is no path: the stage resolves it."""
    text = item["path"]
    path = Path(text).expanduser()
    fix = ("give an absolute path under run_dir, or add a cluster.container_mounts item that mounts its folder "
           "at the same path (SRC:SRC)")
    if not path.is_absolute():
        if HUB_ID.fullmatch(text) and not path.exists():
            return
        raise LaunchError(key, f"{text!r} is a relative path, which a stage in the container reads from the image's "
                          "working directory, not from here", fix)
    path = Path(os.path.normpath(path))
    mounts = [(run_dir, run_dir), *(_mount(item) for item in cluster.container_mounts)]
    if any(path.is_relative_to(source) for source, target in mounts if source == target):
        return
    moved = next((f" (cluster.container_mounts mounts {source} at {target}, another path)"
                  for source, target in mounts if source != target and path.is_relative_to(source)), "")
    raise LaunchError(key, f"{text} is neither under run_dir ({run_dir}) nor under a cluster.container_mounts item "
                      f"mounted at the same path, so the stage in the container does not see it{moved}", fix)


def _mount(item: str) -> tuple[Path, Path]:
    """pyxis's SRC[:DST[:FLAGS]] as (SRC, DST); DST defaults to SRC."""
    source, _, rest = item.partition(":")
    target = rest.split(":")[0] or source
    return Path(os.path.normpath(source)), Path(os.path.normpath(target))


def _check_node_cpus(key: str, stage: str, per_node: int, cluster: ClusterConfig) -> None:
    """In torchrun mode a node's processes are one Slurm task; on a shared node (not
    exclusive) Slurm gives a task one CPU unless told more, which torchrun, every worker and
    their data loading would then share."""
    if (cluster.kind == "slurm" and cluster.launch_mode == "torchrun" and per_node > 1 and not cluster.exclusive
            and cluster.cpus_per_task is None):
        raise LaunchError("cluster.cpus_per_task", f"is unset on shared nodes (cluster.exclusive=false): Slurm would "
                          f"give the one torchrun task per node of {key} ({stage}, {per_node} processes a node) a "
                          "single CPU", "set it to the CPUs a node's processes need (e.g. 8 per GPU: "
                          "cluster.cpus_per_task=64), or set cluster.exclusive=true")


def _process_layout(key: str, entry: StageEntry, parallel: dict, kind: str, gpus: int | None) -> tuple[int, int]:
    """(nodes, processes per node). Total processes: the entry's `nproc`; else one per GPU
    (`gpus` a node) on a GPU cluster; else parallel.tp x parallel.dp with dp=-1 counted as 1."""
    tp, dp = parallel.get("tp", 1), parallel.get("dp", -1)
    if entry.nodes < 1:
        raise LaunchError(f"{key}.nodes", f"must be >= 1, got {entry.nodes}")
    if kind == "local" and entry.nodes > 1:
        raise LaunchError(f"{key}.nodes", f"{entry.nodes} nodes need a cluster", "use cluster=slurm")
    if entry.nproc is not None:
        total = entry.nproc
    elif kind == "slurm" and gpus:
        total = entry.nodes * gpus
    else:
        total = tp * max(dp, 1)
    if total < 1 or total % entry.nodes:
        raise LaunchError(f"{key}.nproc", f"{total} processes do not split evenly over {entry.nodes} nodes")
    if total % tp or (dp > 0 and tp * dp != total):
        raise LaunchError(f"{key}.nproc", f"{total} processes do not fit parallel.tp={tp} x parallel.dp={dp}",
                          "set the entry's nproc or the stage's parallel.* overrides")
    return entry.nodes, total // entry.nodes
