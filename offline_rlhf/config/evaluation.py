"""Configs of `orlhf eval`, `orlhf report` and `orlhf seeds-report`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Optional

from offline_rlhf.config.base import Frozen, require, require_at_most, require_positive, require_run_dir
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import GenerationConfig, ParallelConfig, TemplateConfig

EMBEDDED_TASK = "embedded_task"
HF_RM = "hf_rm"
CALLABLE = "callable"
MAX_BOOTSTRAP = 10**6  # resamples of the win rates' intervals: more only takes longer (hours, after all the work)
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # names files: answers_<name>.jsonl
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class GoldSpec(NamedTuple):
    """`gold=` parsed: kind is "", EMBEDDED_TASK, HF_RM (target: the model directory) or
    CALLABLE (target: `module:function`)."""

    kind: str
    target: str = ""


def parse_gold(spec: str) -> GoldSpec:
    """`embedded_task`, `hf_rm:PATH` or `module:function` (dotted names on both sides)."""
    if spec in ("", EMBEDDED_TASK):
        return GoldSpec(spec)
    kind, colon, target = spec.partition(":")
    if kind == HF_RM and target.strip():
        return GoldSpec(HF_RM, target)
    if colon and _DOTTED.fullmatch(kind) and _DOTTED.fullmatch(target):
        return GoldSpec(CALLABLE, spec)
    raise ConfigError("gold", f"unknown gold reward {spec!r}",
                      "use embedded_task, hf_rm:PATH (a Hugging Face sequence-classification model directory) or "
                      "module:function (a callable (prompt, response) -> float), or leave it empty")


@dataclass
class EvalModelConfig(Frozen):
    """A model to evaluate. A Decision-Transformer checkpoint answers behind the prompt
    `<rm_score> a.b` after the assistant tag, at the target its metadata records
    (`orlhf align method=dt dt_target=...`); `reward_prompt` overrides that target (or
    gives one to any model)."""

    name: str = ""
    checkpoint: str = ""
    reward_prompt: Optional[float] = None


@dataclass
class EvalConfig(Frozen):
    """`orlhf eval`: each model answers held-out prompts; the answers are scored by the gold
    reward (when the prompts have one) and by the reward model, into `run_dir/eval/`."""

    run_dir: str = "runs/default"  # the run folder; outputs go to run_dir/eval/
    # held-out prompts: a JSONL file of {prompt_key: text}, or a Hugging Face dataset id read
    # through `datasets` (its prompts_split; prompts_kind sft: the prompts of its conversations)
    prompts: str = ""
    prompt_key: str = "prompt"  # the prompt's key (column) in `prompts`
    prompts_split: str = "test"  # a hub dataset's split
    prompts_kind: str = "prompts"  # a hub dataset's rows: prompts (one column) or sft (conversations)
    models: list[EvalModelConfig] = field(default_factory=list)  # [{name, checkpoint, reward_prompt}] to evaluate
    baseline: str = "sft"  # differences and win rates are against this model
    rm: str = ""  # "" skips reward-model scoring
    gold: str = ""  # embedded_task | hf_rm:PATH | module:function; "" for none
    template: TemplateConfig = field(default_factory=TemplateConfig)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    batch_size: int = 32  # scoring batch of the reward model (and of a gold hf_rm)
    bootstrap_samples: int = 1000  # resamples of the prompts for the win rates' 95% intervals
    # The head each checkpoint key's model must have (`orlhf launch` checks before queueing).
    checkpoint_heads: ClassVar[dict[str, str]] = {"models.checkpoint": "lm", "rm": "value"}

    def __post_init__(self):
        require_run_dir(self)
        require(self, "prompts", fix="pass a JSONL of held-out prompts")
        if self.prompts_kind not in ("prompts", "sft"):
            raise ConfigError("prompts_kind", f"must be prompts or sft, got {self.prompts_kind!r}")
        require_positive(self, "batch_size", "bootstrap_samples")
        require_at_most(self, MAX_BOOTSTRAP, "bootstrap_samples", fix="1000 (the default) gives stable intervals")
        if not self.models:
            raise ConfigError("models", "is empty", "list the checkpoints to evaluate")
        names = [m.name for m in self.models]
        for index, model in enumerate(self.models):
            require(model, "name", "checkpoint", prefix=f"models[{index}].")
            if not MODEL_NAME.fullmatch(model.name):
                raise ConfigError(f"models[{index}].name", f"{model.name!r} is not a plain name",
                                  "use letters, digits, '_', '.' and '-' (it names answers_<name>.jsonl)")
            if names.count(model.name) > 1:
                raise ConfigError(f"models[{index}].name", f"{model.name!r} is listed twice", "name each model once")
        if self.baseline not in names:
            raise ConfigError("baseline", f"{self.baseline!r} is not among the models {names}", "name one of them")
        parse_gold(self.gold)
        if not self.rm and not self.gold:
            raise ConfigError("rm", "nothing would score the answers", "pass rm=CKPT and/or gold=...")


@dataclass
class ReportConfig(Frozen):
    """`orlhf report`: `run_dir/report.md` and `report.json` from what the stages wrote."""

    run_dir: str = "runs/default"  # the run folder whose ledger, eval and judge results are reported

    def __post_init__(self):
        require_run_dir(self)


@dataclass
class SeedsReportConfig(Frozen):
    """`orlhf seeds-report`: every method across training seeds, from each replicate's
    `report.json` (one complete run per seed: `run_dir/seed_<s>/`, as `pipeline.seeds`
    writes them), into `run_dir/seeds_report.md` and `seeds_report.json`."""

    run_dir: str = "runs/default"  # the folder holding one run per seed (seed_<s>/); the outputs go here
    replicates: list[str] = field(default_factory=list)  # replicate folders inside run_dir; empty: every seed_<s>/
    strict: bool = False  # fail on a replicate or method that would be skipped, instead of listing it

    def __post_init__(self):
        require_run_dir(self)
        root, seen = os.path.realpath(self.run_dir), set()
        for index, folder in enumerate(self.replicates):
            inside = os.path.realpath(os.path.join(self.run_dir, folder))
            if not folder or os.path.commonpath([root, inside]) != root or inside == root:
                raise ConfigError(f"replicates[{index}]", f"{folder!r} is not a folder inside run_dir {self.run_dir}",
                                  "name each replicate's folder relative to run_dir (e.g. seed_1)")
            if inside in seen:
                raise ConfigError(f"replicates[{index}]", f"{folder!r} is listed twice", "name each replicate once")
            seen.add(inside)
