"""One structured config per stage, built from the shared pieces in `schema.py`.

These dataclasses import no torch, so `orlhf STAGE --cfg` and the launcher-facing
validation stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig, ParallelConfig
from offline_rlhf.generation.config import GenerationConfig


@dataclass
class DemoConfig:
    """`orlhf demo`: build the model, train a few steps on synthetic tokens, checkpoint,
    reload and check the reloaded model gives the same logits."""

    run_dir: str = "runs/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    steps: int = 5
    batch_size: int = 4
    seq_len: int = 64
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError("seq_len", f"{self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
                              "lower seq_len or raise model.max_seq_len")


@dataclass
class ConvertConfig:
    """`orlhf convert import_hf hf_dir=... out=...` / `orlhf convert export_hf ckpt=... out=...`."""

    action: str = "import_hf"
    hf_dir: str = ""
    ckpt: str = ""
    out: str = ""
    head: str = "lm"  # "value" imports/exports a sequence-classification (reward) model
    dtype: str = "float32"

    def __post_init__(self):
        if self.action not in ("import_hf", "export_hf"):
            raise ConfigError("action", f"unknown action {self.action!r}", "use import_hf or export_hf")
        needed = ("hf_dir", "out") if self.action == "import_hf" else ("ckpt", "out")
        for key in needed:
            if not getattr(self, key):
                raise ConfigError(key, f"is required for {self.action}", f"pass {key}=PATH")


# ----------------------------------------------------------------------------- shared pieces


@dataclass
class TemplateConfig:
    """The paper's `User: {instruction} Assistant: {response}`."""

    user_tag: str = "User:"
    assistant_tag: str = "Assistant:"
    sep: str = " "


# The reader names of offline_rlhf.data (SFT and preference families); a test keeps them in sync.
SFT_FORMATS = ("oasst", "dolly", "flan_cot", "self_instruct", "jsonl", "hf")
PREFERENCE_FORMATS = ("hh_rlhf", "oasst", "jsonl")


def check_formats(sources, allowed: tuple[str, ...], family: str) -> None:
    for source in sources:
        if source.format not in allowed:
            raise ConfigError(f"data.sources[{source.name or source.path}].format",
                              f"{source.format!r} is not a {family} format", f"use one of {', '.join(allowed)}")


@dataclass
class SourceConfig:
    """One dataset in a mix. `format` names a reader (oasst, dolly, flan_cot, self_instruct,
    jsonl, hf for SFT; hh_rlhf, oasst, jsonl for preferences)."""

    name: str = ""
    format: str = "jsonl"
    path: str = ""
    weight: float = 1.0
    prompt_key: str = "prompt"  # jsonl/hf readers
    response_key: str = "response"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    split: str = "train"  # hf reader

    def __post_init__(self):
        if not self.path:
            raise ConfigError(f"data.sources[{self.name or '?'}].path", "is required", "pass the file (or HF dataset name)")
        if self.format not in SFT_FORMATS + PREFERENCE_FORMATS:
            raise ConfigError(f"data.sources[{self.name or self.path}].format", f"unknown format {self.format!r}",
                              f"use one of {', '.join(sorted(set(SFT_FORMATS + PREFERENCE_FORMATS)))}")
        if self.weight <= 0:
            raise ConfigError(f"data.sources[{self.name or self.path}].weight", f"must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    max_seq_len: int = 2048
    total_samples: Optional[int] = None  # None: every example of every source once (weights then unused)
    val_fraction: float = 0.02
    pack: bool = True
    template: TemplateConfig = field(default_factory=TemplateConfig)

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("data.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.max_seq_len < 2:
            raise ConfigError("data.max_seq_len", f"must be at least 2 (a prompt token and a response token), "
                              f"got {self.max_seq_len}")


@dataclass
class OptimConfig:
    lr: float = 5e-6
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine (to min_lr_ratio * lr) or constant, both after linear warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm limit; <= 0 turns clipping off

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError("optim.schedule", f"unknown schedule {self.schedule!r}", "use cosine or constant")
        if self.lr <= 0:
            raise ConfigError("optim.lr", f"must be > 0, got {self.lr}")


@dataclass
class TrainConfig:
    global_batch: int = 128  # samples (packed sequences, or preference pairs) per optimizer step
    micro_batch: int = 1  # per data-parallel rank per forward/backward
    epochs: float = 1.0
    max_steps: int = -1  # -1: as many as `epochs` gives
    val_every: int = 100  # steps; 0 disables periodic validation (it still runs at the end)
    val_batches: int = 0  # 0: the whole validation split
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 1
    seed: int = 1234

    def __post_init__(self):
        for key in ("global_batch", "micro_batch", "save_every", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}", f"must be positive, got {getattr(self, key)}")


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "offline-rlhf"
    progress: bool = True


@dataclass
class InitConfig:
    """Where the weights start: a checkpoint (root or step dir) from an earlier stage or
    `orlhf convert import_hf`, or random (`checkpoint: ""`)."""

    checkpoint: str = ""
    tokenizer: str = ""  # a tokenizer dir; default: the checkpoint's own tokenizer/


@dataclass
class TrainingStageConfig:
    """What every training stage has: where it writes, the model (for random init; an
    init checkpoint brings its own), the layout, where weights start, the optimizer, the
    loop and logging. Subclasses add `data` and their own keys."""

    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        """Cross-field checks shared by every training stage."""
        if self.data.max_seq_len > self.model.max_seq_len:
            raise ConfigError("data.max_seq_len", f"{self.data.max_seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}", "lower data.max_seq_len or raise model.max_seq_len")


@dataclass
class SFTConfig(TrainingStageConfig):
    """`orlhf sft`: supervised fine-tuning, the paper's Eq. 1 (loss on response tokens only)."""

    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        self.validate()
        if not self.data.sources:
            raise ConfigError("data.sources", "is empty", "list at least one source (see conf/data/)")
        check_formats(self.data.sources, SFT_FORMATS, "supervised (prompt, response)")


@dataclass
class RMConfig(TrainingStageConfig):
    """`orlhf rm`: reward-model training, the paper's Eq. 2, with its defaults (lr 9e-6,
    global batch 128 pairs, 1 epoch). `eval_only=true` scores every pair of `data` with the
    value-head checkpoint `init.checkpoint` and reports accuracy, without training."""

    data: DataConfig = field(default_factory=lambda: DataConfig(pack=False, val_fraction=0.05))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9e-6))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(global_batch=128, epochs=1.0))
    margin: float = 0.0  # subtracted inside the sigmoid of Eq. 2; 0 is the paper's loss
    eval_only: bool = False

    def __post_init__(self):
        self.validate()
        check_formats(self.data.sources, PREFERENCE_FORMATS, "preference (prompt, chosen, rejected)")
        if self.data.pack:
            raise ConfigError("data.pack", "reward-model pairs are never packed", "set data.pack=false")
        if self.eval_only and not self.init.checkpoint:
            raise ConfigError("init.checkpoint", "is required with eval_only=true", "pass a reward-model checkpoint")
        if not self.eval_only and self.data.val_fraction == 0:
            raise ConfigError("data.val_fraction", "must be > 0: the stored reward statistics are computed over "
                              "the validation responses", "use e.g. data.val_fraction=0.05")


@dataclass
class RMScoreConfig:
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
            if not getattr(self, key):
                raise ConfigError(key, "is required", f"pass {key}=PATH")
        if self.batch_size <= 0:
            raise ConfigError("batch_size", f"must be > 0, got {self.batch_size}")


ALIGN_METHODS = ("mle_filter", "rwr", "dt")


@dataclass
class AlignDataConfig:
    """The reward-labeled dataset (`orlhf mix` output): JSONL of {prompt, response, reward}."""

    path: str = ""
    reward_key: str = "reward"  # the normalized reward
    max_seq_len: int = 2048
    val_fraction: float = 0.02
    template: TemplateConfig = field(default_factory=TemplateConfig)


@dataclass
class AlignConfig(TrainingStageConfig):
    """`orlhf align method=mle_filter|rwr|dt`: offline alignment (paper Sec. 3.2) into
    `run_dir/align_<method>/`, starting from the SFT checkpoint."""

    method: str = "dt"
    filter_threshold: float = 0.0  # Eq. 4's t: train on samples with normalized reward > t
    rwr_beta: float = 5.0  # Eq. 5's beta
    rwr_normalize: bool = False  # divide by the weighted token count sum w_i n_i of the global batch
    dt_target: float = 5.0  # the reward prompt used at inference (stored with the checkpoint)
    data: AlignDataConfig = field(default_factory=AlignDataConfig)

    def __post_init__(self):
        self.validate()
        if self.method not in ALIGN_METHODS:
            raise ConfigError("method", f"unknown method {self.method!r}", f"use one of {', '.join(ALIGN_METHODS)}")
        if self.rwr_beta <= 0:
            raise ConfigError("rwr_beta", f"must be > 0, got {self.rwr_beta}")
        if not self.data.path:
            raise ConfigError("data.path", "is required", "pass the labeled JSONL written by `orlhf mix`")

    @property
    def stage_name(self) -> str:
        return f"align_{self.method}"


def check_file_input(list_key: str, name: str, path: str, kind: str, kinds: tuple[str, ...]) -> None:
    """One entry of a list of input files: a known kind and a path."""
    if kind not in kinds:
        raise ConfigError(f"{list_key}[{name or path}].kind", f"unknown kind {kind!r}", f"use {', '.join(kinds)}")
    if not path:
        raise ConfigError(f"{list_key}[{name or '?'}].path", "is required", "pass the file")


@dataclass
class PromptSourceConfig:
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
class GenerateConfig:
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
        if not self.init.checkpoint:
            raise ConfigError("init.checkpoint", "is required", "pass the SFT checkpoint to generate with")


NORMALIZATIONS = ("labeled_set", "rm_stats")


@dataclass
class LabelInputConfig:
    """Samples to label: kind `generated` (the `orlhf generate` samples: prompt, response),
    `sft` (human responses of an SFT dataset, read with `format`) or `preference` (both
    the chosen and the rejected response of every pair)."""

    name: str = ""
    kind: str = "generated"
    format: str = "jsonl"
    path: str = ""
    max_samples: Optional[int] = None  # a seeded subset; None: all

    def __post_init__(self):
        check_file_input("inputs", self.name, self.path, self.kind, ("generated", "sft", "preference"))


@dataclass
class LabelConfig:
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

    def __post_init__(self):
        if not self.rm:
            raise ConfigError("rm", "is required", "pass the reward-model checkpoint (orlhf rm output)")
        if not self.inputs:
            raise ConfigError("inputs", "is empty", "list the samples to label")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError("normalization", f"unknown choice {self.normalization!r}",
                              f"use one of {', '.join(NORMALIZATIONS)}")


@dataclass
class MixWeights:
    """Shares of the alignment dataset; the paper: one third generated, two thirds from
    the SFT and RM datasets (33.3k + 66.6k of 100k)."""

    generated: float = 1.0
    sft: float = 1.0
    preference: float = 1.0  # samples, drawn as whole pairs (chosen and rejected)


@dataclass
class MixConfig:
    """`orlhf mix`: the reward-labeled alignment dataset `run_dir/mix/alignment.jsonl`."""

    run_dir: str = "runs/default"
    input: str = ""
    total: Optional[int] = None  # samples; None: every generated sample plus its weight's share of the rest
    weights: MixWeights = field(default_factory=MixWeights)
    seed: int = 1234

    def __post_init__(self):
        if not self.input:
            raise ConfigError("input", "is required", "pass the labeled samples written by `orlhf label`")
        if min(self.weights.generated, self.weights.sft, self.weights.preference) < 0:
            raise ConfigError("weights", "must be >= 0")
        if self.total is not None and self.total < 1:
            raise ConfigError("total", f"must be >= 1 or null, got {self.total}")


@dataclass
class EvalModelConfig:
    """A model to evaluate. `reward_prompt` set: the Decision-Transformer prompt
    `<rm_score> a.b` with that target score follows the assistant tag."""

    name: str = ""
    checkpoint: str = ""
    reward_prompt: Optional[float] = None


@dataclass
class EvalConfig:
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
        if not self.prompts:
            raise ConfigError("prompts", "is required", "pass a JSONL of held-out prompts")
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
class ReportConfig:
    """`orlhf report`: `run_dir/report.md` and `report.json` from what the stages wrote."""

    run_dir: str = "runs/default"
