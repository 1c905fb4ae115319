"""Configs of the stages that make the alignment data: `orlhf generate`, `orlhf label`,
`orlhf mix` and `orlhf rm-score`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from offline_rlhf.config.base import Frozen, require
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import GenerationConfig, InitConfig, ParallelConfig, TemplateConfig, check_file_input


@dataclass
class PromptSourceConfig(Frozen):
    """Prompts for generation: kind `prompts` (a JSONL of {prompt_key: text}), `sft` or
    `preference` (the prompts of a dataset read with that family's `format` reader)."""

    name: str = ""
    kind: str = "prompts"
    format: str = "jsonl"
    path: str = ""
    weight: float = 1.0
    prompt_key: str = "prompt"

    def __post_init__(self):
        check_file_input("sources", self.name, self.path, self.kind, ("prompts", "sft", "preference"))


@dataclass
class GenerateConfig(Frozen):
    """`orlhf generate`: the SFT model answers prompts (paper step 3; greedy by default, TP=1
    replicas each taking a disjoint shard) into `run_dir/generate/samples.jsonl`."""

    run_dir: str = "runs/default"
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sources: list[PromptSourceConfig] = field(default_factory=list)
    total_prompts: Optional[int] = None  # None: every prompt of every source once
    seed: int = 1234
    template: TemplateConfig = field(default_factory=TemplateConfig)
    max_prompt_tokens: int = 1024  # longer prompts lose their start (counted)
    write_every: int = 64  # prompts per durable write (what a crash can lose)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self):
        if not self.sources:
            raise ConfigError("sources", "is empty", "list at least one prompt source")
        require(self.init, "checkpoint", prefix="init.", fix="pass the SFT checkpoint to generate with")


NORMALIZATIONS = ("labeled_set", "rm_stats")
SELECTIONS = ("all", "best", "worst", "best_worst")


@dataclass
class LabelInputConfig(Frozen):
    """Samples to label: kind `generated` (the `orlhf generate` samples: prompt, response),
    `sft` (human responses of an SFT dataset, read with `format`) or `preference` (both
    the chosen and the rejected response of every pair)."""

    name: str = ""
    kind: str = "generated"
    format: str = "jsonl"
    path: str = ""
    max_samples: Optional[int] = None  # a seeded subset; None: all
    # Generated inputs with several answers per prompt (`generation.n`): keep all, or per
    # prompt the best, the worst, or both by reward (rejection sampling, pair building).
    select: str = "all"

    def __post_init__(self):
        check_file_input("inputs", self.name, self.path, self.kind, ("generated", "sft", "preference"))
        key = f"inputs[{self.name or self.path}].select"
        if self.select not in SELECTIONS:
            raise ConfigError(key, f"unknown choice {self.select!r}", f"use one of {', '.join(SELECTIONS)}")
        if self.select != "all" and self.kind != "generated":
            raise ConfigError(key, f"applies to generated inputs, not {self.kind}", "drop it or set select=all")


@dataclass
class LabelConfig(Frozen):
    """`orlhf label`: the reward model scores every sample (`reward_raw`) and rewards are
    z-score normalized (`reward`) by the statistics of the labeled set or those stored in
    the RM checkpoint, into `run_dir/label/labeled.jsonl`."""

    run_dir: str = "runs/default"
    rm: str = ""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    inputs: list[LabelInputConfig] = field(default_factory=list)
    normalization: str = "labeled_set"
    batch_size: int = 16
    seed: int = 1234
    strict: bool = False  # unusable records (identical pairs, blank text) are errors, not skipped and counted
    # Generated samples cut at max_new_tokens (`finished: false`) are left out and counted;
    # true keeps them, marked, and scores them without the EOS a finished answer ends with.
    include_unfinished: bool = False

    def __post_init__(self):
        require(self, "rm", fix="pass the reward-model checkpoint (orlhf rm output)")
        if not self.inputs:
            raise ConfigError("inputs", "is empty", "list the samples to label")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError("normalization", f"unknown choice {self.normalization!r}",
                              f"use one of {', '.join(NORMALIZATIONS)}")


@dataclass
class MixWeights(Frozen):
    """Shares of the alignment dataset; the paper: one third generated, two thirds from
    the SFT and RM datasets (33.3k + 66.6k of 100k)."""

    generated: float = 1.0
    sft: float = 1.0
    preference: float = 1.0  # samples, drawn as whole pairs (chosen and rejected)


@dataclass
class MixConfig(Frozen):
    """`orlhf mix`: the reward-labeled alignment dataset `run_dir/mix/alignment.jsonl`."""

    run_dir: str = "runs/default"
    input: str = ""
    total: Optional[int] = None  # samples; None: every generated sample plus its weight's share of the rest
    weights: MixWeights = field(default_factory=MixWeights)
    seed: int = 1234

    def __post_init__(self):
        require(self, "input", fix="pass the labeled samples written by `orlhf label`")
        if min(self.weights.generated, self.weights.sft, self.weights.preference) < 0:
            raise ConfigError("weights", "must be >= 0")
        if self.total is not None and self.total < 1:
            raise ConfigError("total", f"must be >= 1 or null, got {self.total}")


@dataclass
class RMScoreConfig(Frozen):
    """`orlhf rm-score ckpt=RM input=in.jsonl output=out.jsonl`: every input record with
    `reward_raw` added, scored in the template and length limit the reward model was trained with."""

    run_dir: str = "runs/default"
    ckpt: str = ""
    input: str = ""
    output: str = ""
    prompt_key: str = "prompt"
    response_key: str = "response"
    batch_size: int = 16
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        for key in ("ckpt", "input", "output"):
            require(self, key, fix=f"pass {key}=PATH")
        if self.batch_size <= 0:
            raise ConfigError("batch_size", f"must be > 0, got {self.batch_size}")
