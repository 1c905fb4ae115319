"""Configs of `orlhf eval` and `orlhf report`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from offline_rlhf.config.base import Frozen, require
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import GenerationConfig, ParallelConfig, TemplateConfig


@dataclass
class EvalModelConfig(Frozen):
    """A model to evaluate. `reward_prompt` set: the Decision-Transformer prompt
    `<rm_score> a.b` with that target score follows the assistant tag."""

    name: str = ""
    checkpoint: str = ""
    reward_prompt: Optional[float] = None


@dataclass
class EvalConfig(Frozen):
    """`orlhf eval`: each model answers held-out prompts; the answers are scored by the gold
    reward (when the prompts have one) and by the reward model, into `run_dir/eval/`."""

    run_dir: str = "runs/default"
    prompts: str = ""
    prompt_key: str = "prompt"
    models: list[EvalModelConfig] = field(default_factory=list)
    baseline: str = "sft"  # win rates are against this model
    rm: str = ""  # "" skips reward-model scoring
    gold: str = ""  # "embedded_task": score with the embedded task's gold reward
    template: TemplateConfig = field(default_factory=TemplateConfig)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    batch_size: int = 32  # reward-model scoring batch

    def __post_init__(self):
        require(self, "prompts", fix="pass a JSONL of held-out prompts")
        if not self.models:
            raise ConfigError("models", "is empty", "list the checkpoints to evaluate")
        names = [m.name for m in self.models]
        if self.baseline not in names:
            raise ConfigError("baseline", f"{self.baseline!r} is not among the models {names}", "name one of them")
        if self.gold not in ("", "embedded_task"):
            raise ConfigError("gold", f"unknown gold reward {self.gold!r}", "use embedded_task or leave it empty")
        if not self.rm and not self.gold:
            raise ConfigError("rm", "nothing would score the answers", "pass rm=CKPT and/or gold=embedded_task")


@dataclass
class ReportConfig(Frozen):
    """`orlhf report`: `run_dir/report.md` and `report.json` from what the stages wrote."""

    run_dir: str = "runs/default"
