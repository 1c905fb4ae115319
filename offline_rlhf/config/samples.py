"""Configs of the stages that make the alignment data: `orlhf generate`, `orlhf label`,
`orlhf mix`, `orlhf reference` and `orlhf rm-score`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from offline_rlhf.config.base import (
    Frozen,
    require,
    require_positive,
    require_run_dir,
    require_seed,
    require_total,
)
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import (
    DatasetInput,
    GenerationConfig,
    InitConfig,
    ParallelConfig,
    TemplateConfig,
    check_file_input,
    check_unique_names,
    check_weight,
)


@dataclass
class InputDataset(DatasetInput):
    """One input of a stage, read with the `format` reader of its `kind` (as `data.sources`
    are, SourceConfig)."""

    kind: str = ""  # which family of readers: prompts, sft, preference (label: also generated)


@dataclass
class PromptSourceConfig(InputDataset):
    """Prompts for generation: kind `prompts` (a JSONL of {prompt_key: text}, or with format
    hf that column of a dataset split), `sft` or `preference` (the prompts of a dataset read
    with that family's `format` reader)."""

    kind: str = "prompts"
    weight: float = 1.0

    def __post_init__(self):
        check_file_input("sources", self.name, self.path, self.kind, ("prompts", "sft", "preference"))
        self.check_layout(f"sources[{self.name or self.path}]")
        check_weight(f"sources[{self.name or self.path}]", self.weight)


def check_prompt_mix(config) -> None:
    """The prompt mix of `orlhf generate` and `orlhf ppo`: some sources, with distinct names,
    and a sane total_prompts."""
    if not config.sources:
        raise ConfigError("sources", "is empty", "list at least one prompt source")
    check_unique_names("sources", config.sources, "sources", "give each source its own name (the key of its counts)")
    require_total(config, "total_prompts", fix="set total_prompts=null for every prompt of every source once")


@dataclass
class GenerateConfig(Frozen):
    """`orlhf generate`: the SFT model answers prompts (paper step 3; greedy by default, TP=1
    replicas each taking a disjoint shard) into `run_dir/generate/samples.jsonl`."""

    run_dir: str = "runs/default"  # the run folder; outputs go to run_dir/generate/
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # prompt sources, mixed by weight: [{name, kind, format, path, weight, ...}]
    sources: list[PromptSourceConfig] = field(default_factory=list)
    total_prompts: Optional[int] = None  # None: every prompt of every source once
    seed: int = 1234  # seeds the prompt mix
    # init.checkpoint's recorded template wins; this applies when it records none (another: an error)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    max_prompt_tokens: int = 1024  # longer prompts lose their oldest exchanges, then their start (counted)
    write_every: int = 64  # prompts per durable write (what a crash can lose)
    strict: bool = False  # unusable prompt records (a blank prompt) are errors, not skipped and counted
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # The head each checkpoint key's model must have (`orlhf launch` checks before queueing).
    checkpoint_heads: ClassVar[dict[str, str]] = {"init.checkpoint": "lm"}

    def __post_init__(self):
        require_run_dir(self)
        check_prompt_mix(self)
        require(self.init, "checkpoint", prefix="init.", fix="pass the SFT checkpoint to generate with")
        require_positive(self, "max_prompt_tokens", "write_every")
        require_seed(self)


NORMALIZATIONS = ("labeled_set", "rm_stats")
SELECTIONS = ("all", "best", "worst", "best_worst")


@dataclass
class LabelInputConfig(InputDataset):
    """Samples to label: kind `generated` (the `orlhf generate` samples: prompt, response),
    `sft` (human responses of an SFT dataset, read with `format`) or `preference` (both
    the chosen and the rejected response of every pair)."""

    kind: str = "generated"
    # a seeded subset of records (sft), pairs (preference) or prompts with all their answers (generated); None: all
    max_samples: Optional[int] = None
    # Generated inputs with several answers per prompt (`generation.n`): keep all, or per
    # prompt the best, the worst, or both by reward (rejection sampling, pair building).
    select: str = "all"

    def __post_init__(self):
        check_file_input("inputs", self.name, self.path, self.kind, ("generated", "sft", "preference"))
        self.check_layout(f"inputs[{self.name or self.path}]")
        if self.kind == "generated" and self.format != "jsonl":
            raise ConfigError(f"inputs[{self.name or self.path}].format", "generated samples are JSONL files",
                              "drop format or set format=jsonl")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"inputs[{self.name or self.path}].max_samples",
                              f"must be >= 1 or null, got {self.max_samples}", "drop it to label every sample")
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

    run_dir: str = "runs/default"  # the run folder; outputs go to run_dir/label/
    rm: str = ""  # the reward model's checkpoint
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # what to label: generated samples, SFT and preference data [{name, kind, format, path, ...}]
    inputs: list[LabelInputConfig] = field(default_factory=list)
    # z-score statistics: labeled_set (this set's) or rm_stats (the RM's validation ones)
    normalization: str = "labeled_set"
    batch_size: int = 16  # sequences per reward-model forward
    seed: int = 1234  # seeds the max_samples draws
    strict: bool = False  # unusable records (identical pairs, blank text) are errors, not skipped and counted
    # Generated samples cut at max_new_tokens (`finished: false`) are left out and counted;
    # true keeps them, marked, and scores them without the EOS a finished answer ends with.
    include_unfinished: bool = False
    write_every: int = 8192  # samples scored per durable write of their rewards (what a kill can lose)
    # The head each checkpoint key's model must have (`orlhf launch` checks before queueing).
    checkpoint_heads: ClassVar[dict[str, str]] = {"rm": "value"}

    def __post_init__(self):
        require_run_dir(self)
        require(self, "rm", fix="pass the reward-model checkpoint (orlhf rm output)")
        if not self.inputs:
            raise ConfigError("inputs", "is empty", "list the samples to label")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError("normalization", f"unknown choice {self.normalization!r}",
                              f"use one of {', '.join(NORMALIZATIONS)}")
        check_unique_names("inputs", self.inputs, "inputs",
                           "give each input its own name (its records' `source` in labeled.jsonl)")
        require_positive(self, "batch_size", "write_every")
        require_seed(self)


@dataclass
class MixWeights(Frozen):
    """Shares of the alignment dataset; the paper: one third generated, two thirds from
    the SFT and RM datasets (33.3k + 66.6k of 100k)."""

    generated: float = 1.0  # generated samples
    sft: float = 1.0  # SFT demonstrations
    preference: float = 1.0  # samples, drawn as whole pairs (chosen and rejected)


@dataclass
class MixConfig(Frozen):
    """`orlhf mix`: the reward-labeled alignment dataset `run_dir/mix/alignment.jsonl`."""

    run_dir: str = "runs/default"  # the run folder; outputs go to run_dir/mix/
    input: str = ""  # the labeled JSONL from `orlhf label`
    total: Optional[int] = None  # samples; None: every generated sample plus its weight's share of the rest
    weights: MixWeights = field(default_factory=MixWeights)
    seed: int = 1234  # seeds the draws

    def __post_init__(self):
        require_run_dir(self)
        require(self, "input", fix="pass the labeled samples written by `orlhf label`")
        weights = {group: getattr(self.weights, group) for group in ("generated", "sft", "preference")}
        for group, weight in weights.items():
            if weight < 0:
                raise ConfigError(f"weights.{group}", f"must be >= 0, got {weight}")
        if not any(weights.values()):
            raise ConfigError("weights", "are all 0", "give weights.generated, weights.sft or weights.preference "
                                                      "a positive share")
        require_total(self, "total")
        require_seed(self)


@dataclass
class PairWeights(Frozen):
    """Shares of the preference-pair dataset (in pairs)."""

    rm_ranked: float = 1.0  # best vs worst of the generated answers to a prompt, by the RM
    human: float = 1.0  # human preference pairs (`orlhf label` inputs of kind preference)


@dataclass
class ReferenceConfig(Frozen):
    """`orlhf reference`: preference pairs for DPO/IPO/cDPO from `orlhf label` output (RM-ranked
    best vs worst generated answers, and human pairs) with the summed log-probs of both
    replies under the reference (SFT) model, computed once, into `run_dir/reference/pairs.jsonl`.
    `max_seq_len` must equal align's `data.max_seq_len` (it checks); `template` applies only
    when init.checkpoint records none (its recorded template wins; another set here is an error)."""

    run_dir: str = "runs/default"  # the run folder; outputs go to run_dir/reference/
    init: InitConfig = field(default_factory=InitConfig)  # the reference model: the SFT checkpoint
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    input: str = ""  # the labeled JSONL from `orlhf label`
    min_gap: float = 0.5  # least normalized-reward gap between the best and the worst answer of a prompt
    weights: PairWeights = field(default_factory=PairWeights)
    total: Optional[int] = None  # pairs; None: every pair once
    seed: int = 1234  # seeds the pair mix
    template: TemplateConfig = field(default_factory=TemplateConfig)
    max_seq_len: int = 512  # tokens per reply sequence (as align's data.max_seq_len)
    batch_size: int = 16  # sequences per reference-model forward
    write_every: int = 256  # pairs per durable write (what a crash can lose)
    strict: bool = False  # a pair identical after truncation to max_seq_len is an error, not skipped and counted
    # The head each checkpoint key's model must have (`orlhf launch` checks before queueing).
    checkpoint_heads: ClassVar[dict[str, str]] = {"init.checkpoint": "lm"}

    def __post_init__(self):
        require_run_dir(self)
        require(self, "input", fix="pass the labeled samples written by `orlhf label`")
        require(self.init, "checkpoint", prefix="init.", fix="pass the SFT checkpoint (the DPO reference model)")
        require_positive(self, "batch_size", "write_every")
        if self.min_gap < 0:
            raise ConfigError("min_gap", f"must be >= 0, got {self.min_gap}")
        if min(self.weights.rm_ranked, self.weights.human) < 0:
            raise ConfigError("weights", "must be >= 0")
        require_total(self, "total")
        require_seed(self)
        if self.max_seq_len < 2:
            raise ConfigError("max_seq_len", f"must be at least 2, got {self.max_seq_len}")


@dataclass
class RMScoreConfig(Frozen):
    """`orlhf rm-score ckpt=RM input=in.jsonl output=out.jsonl`: every input record with
    `reward_raw` added, scored in the template and length limit the reward model was trained with."""

    run_dir: str = "runs/default"  # the run folder (stage folder and ledger)
    ckpt: str = ""  # the reward model's checkpoint
    input: str = ""  # a JSONL of records to score
    output: str = ""  # the JSONL written: each record plus reward_raw
    prompt_key: str = "prompt"  # the key of the prompt in each record
    response_key: str = "response"  # the key of the answer in each record
    batch_size: int = 16  # sequences per reward-model forward
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # The head each checkpoint key's model must have (`orlhf launch` checks before queueing).
    checkpoint_heads: ClassVar[dict[str, str]] = {"ckpt": "value"}

    def __post_init__(self):
        require_run_dir(self)
        for key in ("ckpt", "input", "output"):
            require(self, key, fix=f"pass {key}=PATH")
        if os.path.isdir(self.output):  # found only once every record is scored, leaving output.tmp
            raise ConfigError("output", f"{self.output} is a folder", "pass the JSONL file to write")
        require_positive(self, "batch_size")
