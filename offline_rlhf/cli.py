"""`orlhf STAGE [hydra overrides...]`: one entry point for every stage.

Imports are lazy so `orlhf launch`, `orlhf STAGE --cfg` and `--check` never load torch
(tests/unit/launcher/test_stage_checks.py holds `--check` to it).
Common flags: `--cfg` prints the resolved config and exits; `--check` validates the stage for
`ORLHF_CHECK_WORLD_SIZE` processes without loading a model and prints its input paths as
JSON (`orlhf launch` runs it for every stage); `--config-dir DIR` adds a folder of the
user's own configs; `-h/--help` lists stages.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    module: str  # has main(config) (or main(argv) when schema is empty)
    schema: str  # "module:Class" of the stage's config dataclass; "" for stages that parse their own args
    summary: str
    positional: str = ""  # config key filled by a bare first argument (`orlhf convert import_hf ...`)


STAGES = {
    "task": Stage("offline_rlhf.stages.task", "offline_rlhf.config.tools:TaskConfig",
                  "write the embedded gold-reward task (demo data, prompts, tokenizer) into run_dir/task/"),
    "sft": Stage("offline_rlhf.stages.sft", "offline_rlhf.config.training:SFTConfig",
                 "supervised fine-tuning (paper Eq. 1) into run_dir/sft/"),
    "rm": Stage("offline_rlhf.stages.rm", "offline_rlhf.config.training:RMConfig",
                "reward-model training (paper Eq. 2) into run_dir/rm/; eval_only=true reports accuracy"),
    "generate": Stage("offline_rlhf.stages.generate", "offline_rlhf.config.samples:GenerateConfig",
                      "the SFT model answers a mix of prompts (TP=1 replicas) into run_dir/generate/"),
    "label": Stage("offline_rlhf.stages.label", "offline_rlhf.config.samples:LabelConfig",
                   "reward-label and z-score normalize samples into run_dir/label/"),
    "mix": Stage("offline_rlhf.stages.mix", "offline_rlhf.config.samples:MixConfig",
                 "the reward-labeled alignment dataset from generated and human samples into run_dir/mix/"),
    "reference": Stage("offline_rlhf.stages.reference", "offline_rlhf.config.samples:ReferenceConfig",
                       "DPO/IPO/cDPO preference pairs with their reference (SFT) log-probs into run_dir/reference/"),
    "align": Stage("offline_rlhf.stages.align", "offline_rlhf.config.training:AlignConfig",
                   "offline alignment: method=mle_filter|rwr|dt (paper Eqs. 4-6) or dpo|ipo|cdpo (pairs from "
                   "`orlhf reference`) into run_dir/align_<method>/"),
    "eval": Stage("offline_rlhf.stages.eval", "offline_rlhf.config.evaluation:EvalConfig",
                  "held-out answers of each model scored by the gold reward and the RM into run_dir/eval/"),
    "serve": Stage("offline_rlhf.stages.serve", "offline_rlhf.config.serving:ServeConfig",
                   "an OpenAI-compatible HTTP server (chat, completions) for one checkpoint, TP over the world"),
    "judge": Stage("offline_rlhf.stages.judge", "offline_rlhf.config.judging:JudgeConfig",
                   "grade answers with a judge model at an OpenAI-compatible endpoint into run_dir/judge/"),
    "report": Stage("offline_rlhf.stages.report", "offline_rlhf.config.evaluation:ReportConfig",
                    "report.md / report.json: evaluation, reward distribution, device-hours per method"),
    "seeds-report": Stage("offline_rlhf.stages.seeds_report", "offline_rlhf.config.evaluation:SeedsReportConfig",
                          "seeds_report.md / .json: every method across training seeds (run_dir/seed_<s>/report.json)"),
    "rm-score": Stage("offline_rlhf.stages.rm_score", "offline_rlhf.config.samples:RMScoreConfig",
                      "add reward_raw to every record of a JSONL file with a reward model"),
    "convert": Stage("offline_rlhf.stages.convert", "offline_rlhf.config.tools:ConvertConfig",
                     "import_hf / export_hf: Hugging Face checkpoint conversion", positional="action"),
    "smoke": Stage("offline_rlhf.stages.smoke", "offline_rlhf.config.tools:SmokeConfig",
                   "build, train a few steps, checkpoint and reload (a smoke run of the foundation)"),
    "ppo": Stage("ppo_baseline.stage", "ppo_baseline.config:PPOConfig",
                 "the PPO baseline: an actor and reward, reference and critic services over HTTP, into run_dir/ppo/"),
    "launch": Stage("offline_rlhf.stages.launch", "", "run a pipeline locally or as chained Slurm jobs"),
    "pipeline": Stage("offline_rlhf.stages.launch", "",
                      "run a whole pipeline here (default: the embedded demo), resuming after failures"),
}

# Stages whose rerun after Ctrl-C goes on from the work saved so far: checkpoints (sft, rm,
# align, ppo), fsynced shards, scores or call logs (generate, label, reference, judge), each
# model's answers (eval), the stages a pipeline finished (launch, pipeline). The others start over.
RESUMABLE = frozenset({"sft", "rm", "generate", "label", "reference", "align", "eval", "judge", "ppo", "launch",
                       "pipeline"})


PIPELINE_USAGE = """\
usage: orlhf pipeline [pipeline=NAME] [run_dir=DIR] [key=value ...] [--dry-run] [--config-dir DIR]

Runs a whole pipeline on this machine (`orlhf launch cluster=local ...`): the embedded demo
(conf/pipeline/demo.yaml) unless pipeline=NAME names another, into run_dir (default runs/<pipeline name>).
A rerun skips the stages already complete and resumes the others. The keys and options are
`orlhf launch`'s (`orlhf launch --help`).
  orlhf pipeline run_dir=runs/demo
  orlhf pipeline run_dir=runs/demo_seeds 'pipeline.seeds=[0,1,2]'   (once per training seed, then seeds-report)
  orlhf pipeline --config-dir my_conf pipeline=dt_rounds run_dir=R"""


def usage() -> str:
    lines = ["usage: orlhf STAGE [key=value ...] [--config-dir DIR] [--cfg] [--check]", "", "stages:"]
    lines += [f"  {name:<12} {stage.summary}" for name, stage in STAGES.items()]
    return "\n".join(lines)


def stage_help(name: str, stage: Stage, overrides: list[str], config_dirs: list[str]) -> str:
    from offline_rlhf.config.compose import composed_defaults
    from offline_rlhf.config.help import format_keys, key_rows

    schema = _load(stage.schema)
    doc = (schema.__doc__ or "").strip()
    keys = format_keys(key_rows(schema, composed_defaults(name, schema, overrides, config_dirs)))
    return (f"usage: orlhf {name} [key=value ...] [--config-dir DIR] [--cfg] [--check]\n\n{stage.summary}\n\n"
            f"{doc}\n\nkeys (default; ??? = no default), from conf/stage/{name}.yaml:\n{keys}\n\n"
            f"`orlhf {name} --cfg` prints the resolved config with your overrides; `--config-dir DIR` adds your own "
            "configs (DIR/model/my_model.yaml is model=my_model) beside the shipped ones.")


def _load(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, args = argv[0], argv[1:]
    if name not in STAGES:
        near = difflib.get_close_matches(name, STAGES, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        print(f"orlhf: unknown stage {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    stage = STAGES[name]
    if name == "pipeline" and ("-h" in args or "--help" in args):  # not `orlhf launch --help`, which it runs
        print(PIPELINE_USAGE)
        return 0
    if name == "pipeline":  # `orlhf launch` on this machine, the demo unless another pipeline is named
        args = [*(() if any(a.startswith("pipeline=") for a in args) else ("pipeline=demo",)), "cluster=local", *args]
    from offline_rlhf.config.compose import CONFIG_DIR_FLAG, compose_stage, split_config_dirs, to_yaml
    from offline_rlhf.config.errors import ConfigError

    config_dirs, args = split_config_dirs(args)
    if not stage.schema:  # the launcher: it searches the folders too and passes them on to every stage
        return _load(f"{stage.module}:main")([*args, *(f"{CONFIG_DIR_FLAG}={d}" for d in config_dirs)]) or 0
    if stage.positional and args and "=" not in args[0] and not args[0].startswith("-"):
        args = [f"{stage.positional}={args[0]}", *args[1:]]
    if "-h" in args or "--help" in args:
        print(stage_help(name, stage, [a for a in args if "=" in a], config_dirs))
        return 0
    option = next((a for a in args if a.startswith("-") and a not in FLAGS), None)
    if option is not None:  # a misspelt flag (`--confg-dir=D`) is no override to quote
        raise ConfigError(option, "unknown option", f"the options are {CONFIG_DIR_FLAG} DIR, {', '.join(FLAGS)} "
                          "and --help")
    stray = next((a for a in args if "=" not in a and a not in FLAGS), None)
    if stray is not None:
        raise ConfigError(stray, "is not an override", f"write key=value; `orlhf {name} --cfg` lists the keys")
    config = compose_stage(name, _load(stage.schema), [a for a in args if a not in FLAGS], config_dirs)
    if "--cfg" in args:
        print(to_yaml(config).rstrip())
        return 0
    if "--check" in args:
        print(json.dumps(check_stage(config)))
        return 0
    return _load(f"{stage.module}:main")(config) or 0


FLAGS = ("--cfg", "--check")
OTHER_RANKS_WAIT_S = 5.0  # before a rank other than 0 reports a failure (say_once)
# The process count `orlhf STAGE --check` validates for (the launcher sets it: nodes x
# processes per node); unset: parallel.tp x parallel.dp, dp=-1 counting as 1.
CHECK_WORLD_SIZE = "ORLHF_CHECK_WORLD_SIZE"
# Config fields that name files or folders a stage reads: (dotted attribute path, list
# attribute or ""). `hf` sources may name a Hugging Face dataset instead of a path.
INPUT_FIELDS = (("data.sources", "path"), ("data.path", ""), ("data.pairs", ""), ("sources", "path"),
                ("inputs", "path"), ("input", ""), ("prompts", ""), ("rm", ""), ("ckpt", ""), ("init.checkpoint", ""),
                ("init.tokenizer", ""), ("models", "checkpoint"), ("questions", ""), ("answers", "path"),
                ("reference_answers", ""), ("judge_prompts", ""), ("services.reward.checkpoint", ""),
                ("services.reference.checkpoint", ""), ("services.critic.checkpoint", ""))


def check_stage(config) -> dict:
    """`orlhf STAGE --check`: what would fail once the stage has its processes, found without
    loading a model: the parallel layout for the world size (and the stage's model, when an
    existing init checkpoint or `model` fixes it), rows and answers that fit that model, the
    global batch split over data-parallel ranks, a tokenizer to start from. Raises
    ConfigError (one line); returns the input paths the stage reads, for the launcher to
    match against what earlier stages write."""
    from offline_rlhf.config.errors import ConfigError
    from offline_rlhf.parallel.dims import ParallelDims

    parallel = getattr(config, "parallel", None)
    default = parallel.tp * max(parallel.dp, 1) if parallel is not None else 1
    raw = os.environ.get(CHECK_WORLD_SIZE, str(default))
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(CHECK_WORLD_SIZE, f"must be a process count >= 1, got {raw!r}")
    world = int(raw)
    metas = {}  # the metadata of each checkpoint read, by config key: each is resolved and read once
    inputs = [{"key": key, "path": path, "exists": os.path.exists(path),
               "head": checkpoint_head(config, key, path, metas)} for key, path in input_paths(config)]
    model = _stage_model(config, metas)
    if parallel is not None:
        dims = ParallelDims.build(parallel, world, model)
        train = None if getattr(config, "eval_only", False) else getattr(config, "train", None)
        if hasattr(train, "global_batch") and hasattr(train, "micro_batch"):
            dims.per_rank_batch(train.global_batch, train.micro_batch)
        check_world = getattr(config, "check_world", None)  # a stage's own rules for its world (the PPO actor's)
        if callable(check_world):
            check_world(dims.dp)
    check_fits(config, model)
    if getattr(config, "init", None) is not None:
        check_tokenizer(config.init, model)
    return {"world_size": world, "inputs": inputs}


def check_tokenizer(init, model) -> None:
    """A tokenizer to start from (`init.tokenizer`, or the init checkpoint's own) and, once
    it exists and the model is known, one that fits the model's vocabulary and names an EOS,
    as the stage requires (`load_tokenizer`)."""
    if not init.tokenizer:
        init.require_tokenizer_source()
        if not _complete_checkpoint(init.checkpoint, "init.checkpoint"):
            return  # an earlier stage writes it
    from offline_rlhf.data.tokenizer import TOKENIZER_FILE
    from offline_rlhf.stage_checks import load_tokenizer, tokenizer_dir

    if model is not None and (tokenizer_dir(init) / TOKENIZER_FILE).is_file():
        load_tokenizer(init, model)


def checkpoint_head(config, key: str, path: str, metas: dict) -> str | None:
    """The head the checkpoint at `path` (config key `key`) must hold (`checkpoint_heads`;
    None: any). One that exists is checked now (its metadata kept in `metas[key]`); the
    launcher checks one an earlier stage will write against that stage's kind."""
    head = getattr(config, "checkpoint_heads", {}).get(re.sub(r"\[\d+\]", "", key))
    if head is not None and (resolved := _complete_checkpoint(path, key)) is not None:
        from offline_rlhf.checkpoint_meta import checkpoint_of_head

        metas[key] = checkpoint_of_head(resolved, head, key)
    return head


def check_fits(config, model) -> None:
    """What the stage would refuse once it has read its model's config: training rows, or
    the answers it generates, longer than the model's context (TP-independent)."""
    if model is None:
        return
    from offline_rlhf.config.errors import ConfigError
    from offline_rlhf.stage_checks import check_sequence_length

    check_sequence_length(config, model)
    generation = getattr(config, "generation", None)
    if generation is not None and generation.max_new_tokens >= model.max_seq_len:
        raise ConfigError("generation.max_new_tokens", f"{generation.max_new_tokens} leaves no room for a prompt in "
                          f"the model's max_seq_len={model.max_seq_len}", "lower it")


def _stage_model(config, metas: dict):
    """The model the stage runs when known now: an existing init (or first evaluated)
    checkpoint's, else `model`; None when an earlier stage has yet to write the checkpoint.
    `metas`: the checkpoints `checkpoint_head` read, by config key (not read again)."""
    from offline_rlhf.config.schema import ModelConfig

    init, models = getattr(config, "init", None), getattr(config, "models", None)
    checkpoint, key = ((init.checkpoint, "init.checkpoint") if init is not None and init.checkpoint else
                       (models[0].checkpoint, "models[0].checkpoint") if models else ("", ""))
    if key in metas:
        return metas[key].model
    if checkpoint:
        resolved = _complete_checkpoint(checkpoint, key)
        if resolved is None:
            return None
        from offline_rlhf.checkpoint_meta import read_meta

        return read_meta(resolved).model
    model = getattr(config, "model", None)
    return model if isinstance(model, ModelConfig) else None


def _complete_checkpoint(path: str, key: str):
    """The checkpoint `path` resolves to, or None while it has none yet (an earlier stage
    writes it, or left it without a complete step on a crash that a pipeline rerun resumes)."""
    from offline_rlhf.config.errors import ConfigError

    if os.path.isfile(path):
        raise ConfigError(key, f"{path} is a file, not a checkpoint folder", "pass a checkpoint folder (a stage's "
                          "checkpoints/ or one of its step_* folders)")
    if not os.path.exists(path):
        return None
    from offline_rlhf.checkpoint_meta import resolve_checkpoint

    try:
        return resolve_checkpoint(path, key)
    except ConfigError:
        return None


def input_paths(config) -> list[tuple[str, str]]:
    """(key, path) for every file or folder the stage's config names as an input (a Hugging
    Face repo id in a checkpoint or tokenizer key is not a path: the stage resolves it)."""
    from offline_rlhf.hub import parse_repo_id

    found, unread = [], getattr(config, "unread_inputs", ())
    for dotted, item_key in INPUT_FIELDS:
        if dotted in unread:
            continue
        value = config
        for part in dotted.split("."):
            value = getattr(value, part, None)
        if not item_key:
            if isinstance(value, str) and value and parse_repo_id(value, dotted) is None:
                found.append((dotted, value))
            continue
        for index, item in enumerate(value if isinstance(value, (list, tuple)) else ()):
            path = getattr(item, item_key, "")
            if path and getattr(item, "format", "") != "hf":
                found.append((f"{dotted}[{index}].{item_key}", path))
    return found


def main(argv: list[str] | None = None) -> int:
    from offline_rlhf.config.errors import ConfigError
    from offline_rlhf.data.errors import DataError

    argv = sys.argv[1:] if argv is None else argv
    try:
        code = run(argv)
    except (ConfigError, DataError) as err:
        say_once(error_line(argv, str(err)))
        code = 2
    except RuntimeError as err:
        if not lost_another_process(err):
            raise
        first = str(err).splitlines()[0][:200]
        say_once(error_line(argv, f"lost contact with another process of the job ({first}): one ended first; its "
                                  "own error line or torchrun's summary says which and why"))
        code = 1
    except SystemExit as stop:  # a stage that stopped on request (its work saved): its exit status
        code = stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback, saying whether a rerun resumes
        if process_rank() == "0":  # a terminal's Ctrl-C reaches every rank: rank 0 says it
            print(interrupted_line(argv), file=sys.stderr, flush=True)
        code = 130
    except BrokenPipeError:  # the reader went away (`orlhf sft --help | head`): stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush fails no more
        code = 128 + signal.SIGPIPE
    if multi_process():
        _exit_without_teardown(code)
    return code


# How a collective fails on the processes left when another one of the job has died (gloo's
# transport; NCCL's watchdog aborts the process instead): the cause is the dead one's.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")


def lost_another_process(err: RuntimeError) -> bool:
    """Whether a multi-process stage failed only because another process of its job died."""
    return multi_process() and any(text in str(err) for text in PEER_LOST)


def multi_process() -> bool:
    """Whether this process is one of several of its job (torchrun's, or Slurm's tasks)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def error_line(argv: list[str], reason: str) -> str:
    """`orlhf STAGE: error: ...`, with the rank of a process other than rank 0 (a data file
    only that rank's node sees damaged or different, or rank 0 died first)."""
    rank = process_rank()
    return f"orlhf {argv[0] if argv else ''}: error: {'' if rank == '0' else f'rank {rank}: '}{reason}"


def process_rank() -> str:
    """This process's rank in its job: torchrun's RANK, or Slurm's task number in tasks mode."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def interrupted_line(argv: list[str]) -> str:
    """What Ctrl-C leaves, for the stage `argv` runs: resumable work, or nothing (`rm
    eval_only=true` only scores, from the start each time)."""
    name = argv[0] if argv else ""
    overrides = [arg for arg in argv[1:] if "=" in arg and not arg.startswith("-")]
    resumes = name in RESUMABLE and not (name == "rm" and _set_true(overrides, "eval_only"))
    then = ("rerun the same command to resume" if resumes
            else "nothing was kept: rerun the same command to start it over")
    return f"orlhf {name}: interrupted (Ctrl-C); {then}"


def _set_true(overrides: list[str], key: str) -> bool:
    """Whether the Hydra `overrides` set `key` to a true value (as the config would read it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return False
    return any(o.key_or_group.lstrip("+") == key and str(o.value()).lower() in ("true", "1", "yes", "on")
               for o in parsed)


def say_once(message: str) -> None:
    """Every rank fails the same way: under torchrun rank 0 says it, and the others first
    wait a moment, in which torchrun ends them once rank 0 has exited. They used to stay
    silent, and a rank that exited first got rank 0 killed before it printed: no message at
    all. Now one that outlives the wait says it too (rank 0 never failed, or is slow)."""
    if process_rank() != "0":
        time.sleep(OTHER_RANKS_WAIT_S)
    print(message, file=sys.stderr, flush=True)


def _exit_without_teardown(code: int) -> None:
    """Gloo worker threads can still hold collective work objects after the process group
    is destroyed; freeing them during interpreter finalization aborts the process
    (SIGABRT, "terminate called without an active exception"), seen under heavy CPU load.
    Everything is written and the group destroyed by now, so skip finalization."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
