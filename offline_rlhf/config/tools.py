"""Configs of the stages around the chain: `orlhf task` (the embedded task's data),
`orlhf smoke` (a foundation smoke run) and `orlhf convert` (Hugging Face checkpoints)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from offline_rlhf.config.base import Frozen, require, require_at_most, require_positive, require_run_dir, require_seed
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig, ParallelConfig

# Facts of the embedded task (offline_rlhf.data.embedded_task imports the first; a test keeps
# the second equal to what its instruction pools can hold out).
TASK_FLAWS = ("wrong", "truncated", "off_topic", "rambling")
TASK_MAX_EVAL_PROMPTS = 14096
# The task's BPE vocabulary: its small corpus runs out of merges long before this, and the
# tokenizer trainer allocates for vocab_size up front (1e12 aborted the process).
TASK_MAX_VOCAB = 1_000_000


def _even_flaws() -> dict[str, float]:
    return dict.fromkeys(TASK_FLAWS, 1.0)


@dataclass
class TaskConfig(Frozen):
    """Sizes and noise of the generated task; outputs go to `run_dir/task/`.

    SFT demonstrations are `good_fraction` good, the rest flawed in proportion to
    `flaw_weights` (wrong, truncated, off_topic, rambling). Preference labels follow
    Bradley-Terry on the gold rewards with `bt_temperature` (small: nearly always the
    better response; large: a coin flip).
    """

    run_dir: str = "runs/demo"  # the run folder; the task goes to run_dir/task/
    seed: int = 0  # seeds every sampled record
    n_sft: int = 2000  # SFT demonstrations (prompt, answer): good_fraction good, the rest flawed
    n_preferences: int = 2000  # preference pairs for the reward model
    n_gen_prompts: int = 600  # prompts for generation
    n_eval_prompts: int = 200  # held-out prompts for evaluation
    good_fraction: float = 0.4  # share of demonstrations without flaws
    # relative frequency of each kind of flaw in poor answers
    flaw_weights: dict[str, float] = field(default_factory=_even_flaws)
    bt_temperature: float = 0.5  # Bradley-Terry temperature of the gold preferences (lower: cleaner labels)
    vocab_size: int = 512  # size of the task's BPE tokenizer

    def __post_init__(self):
        require_run_dir(self)
        require_seed(self)
        for key in ("n_sft", "n_preferences", "n_gen_prompts", "n_eval_prompts"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.n_eval_prompts > TASK_MAX_EVAL_PROMPTS:
            raise ConfigError("n_eval_prompts", f"{self.n_eval_prompts} exceeds the {TASK_MAX_EVAL_PROMPTS} "
                              "instructions that can be held out", f"use at most {TASK_MAX_EVAL_PROMPTS}")
        if not 0.0 <= self.good_fraction <= 1.0:
            raise ConfigError("good_fraction", f"must be in [0, 1], got {self.good_fraction}")
        self._check_flaw_weights()
        if self.bt_temperature <= 0:
            raise ConfigError("bt_temperature", f"must be > 0, got {self.bt_temperature}")
        # 256 byte symbols and 3 special tokens come first; the rest are merges.
        if self.vocab_size < 300:
            raise ConfigError("vocab_size", f"must be >= 300, got {self.vocab_size}",
                              "the byte alphabet and special tokens take 259 ids")
        require_at_most(self, TASK_MAX_VOCAB, "vocab_size", fix="the task's corpus runs out of merges far sooner")

    def _check_flaw_weights(self):
        unknown = sorted(set(self.flaw_weights) - set(TASK_FLAWS))
        if unknown:
            raise ConfigError(f"flaw_weights.{unknown[0]}", "unknown flaw", f"use {', '.join(TASK_FLAWS)}")
        total = sum(self.flaw_weights.values())  # 1e308 + 1e308 is inf: every share would be NaN
        if any(weight < 0 for weight in self.flaw_weights.values()) or not 0 < total < math.inf:
            raise ConfigError("flaw_weights", f"weights must be >= 0 with a positive, finite sum, got "
                              f"{self.flaw_weights}", "they are relative: e.g. 1.0 each")


@dataclass
class SmokeConfig(Frozen):
    """`orlhf smoke`: build the model, train a few steps on synthetic tokens, checkpoint,
    reload and check the reloaded model gives the same logits."""

    run_dir: str = "runs/smoke"  # the run folder; outputs go to run_dir/smoke/
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    steps: int = 5  # training steps
    batch_size: int = 4  # sequences per step
    seq_len: int = 64  # tokens per sequence
    lr: float = 1e-3  # learning rate
    seed: int = 0  # seeds the data and the weights

    def __post_init__(self):
        require_run_dir(self)
        require_positive(self, "steps", "batch_size", "seq_len", "lr")
        require_seed(self)
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError("seq_len", f"{self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
                              "lower seq_len or raise model.max_seq_len")


@dataclass
class ConvertConfig(Frozen):
    """`orlhf convert import_hf hf_dir=... out=...` / `orlhf convert export_hf ckpt=... out=...`."""

    action: str = "import_hf"  # import_hf (Hugging Face -> checkpoint) or export_hf (checkpoint -> Hugging Face)
    hf_dir: str = ""  # a Hugging Face model folder, or a hub repo id org/name[@revision] (safetensors only)
    ckpt: str = ""  # export_hf: the checkpoint to export
    out: str = ""  # the folder written
    head: str = "lm"  # "value" imports/exports a sequence-classification (reward) model
    dtype: str = "float32"  # export_hf: the weights' dtype in the safetensors files

    def __post_init__(self):
        if self.action not in ("import_hf", "export_hf"):
            raise ConfigError("action", f"unknown action {self.action!r}", "use import_hf or export_hf")
        for key in ("hf_dir", "out") if self.action == "import_hf" else ("ckpt", "out"):
            require(self, key, fix=f"pass {key}=PATH for {self.action}")
