"""Configs of the training stages: `orlhf sft`, `orlhf rm` and `orlhf align`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from offline_rlhf.config.base import Frozen, require, require_run_dir
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import (
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    DataConfig,
    InitConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    SequenceDataConfig,
    TrainConfig,
)


@dataclass
class TrainingStageConfig(Frozen):
    """What every training stage has: where it writes, the model (for random init; an
    init checkpoint brings its own), the layout, where weights start, the optimizer, the
    loop, logging and its data. Subclasses narrow `data` and add their own keys."""

    run_dir: str = "runs/default"  # the run folder; the stage writes run_dir/<stage>/
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: SequenceDataConfig = field(default_factory=SequenceDataConfig)
    # The head each checkpoint key's model must have (`orlhf launch` checks before queueing):
    # a language model starts SFT and alignment (and a reward model, whose value head starts new).
    checkpoint_heads: ClassVar[dict[str, str]] = {"init.checkpoint": "lm"}

    def validate(self) -> None:
        """Cross-field checks shared by every training stage. With `init.checkpoint` the
        checkpoint's model counts, checked at stage start (`stage_checks.check_sequence_length`)."""
        require_run_dir(self)
        if not self.init.checkpoint and self.data.max_seq_len > self.model.max_seq_len:
            raise ConfigError("data.max_seq_len", f"{self.data.max_seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}", "lower data.max_seq_len or raise model.max_seq_len")


@dataclass
class SFTConfig(TrainingStageConfig):
    """`orlhf sft`: supervised fine-tuning, the paper's Eq. 1 (loss on response tokens only)."""

    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        self.validate()
        self.data.check_sources(SFT_FORMATS, "supervised (prompt, response)")


@dataclass
class RMConfig(TrainingStageConfig):
    """`orlhf rm`: reward-model training, the paper's Eq. 2, with its defaults (lr 9e-6,
    global batch 128 pairs, 1 epoch). `eval_only=true` scores every pair of `data` with the
    value-head checkpoint `init.checkpoint` and reports accuracy, without training."""

    data: DataConfig = field(default_factory=lambda: DataConfig(pack=False, val_fraction=0.05))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9e-6))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(global_batch=128, epochs=1.0))
    margin: float = 0.0  # subtracted inside the sigmoid of Eq. 2; 0 is the paper's loss
    eval_only: bool = False  # score `data` with init.checkpoint's reward model (accuracy), no training

    @property
    def checkpoint_heads(self) -> dict[str, str]:
        """Training may start from a language model or a reward model; `eval_only` scores with one."""
        return {"init.checkpoint": "value"} if self.eval_only else {}

    def __post_init__(self):
        self.validate()
        self.data.check_sources(PREFERENCE_FORMATS, "preference (prompt, chosen, rejected)")
        if self.data.pack:
            raise ConfigError("data.pack", "reward-model pairs are never packed", "set data.pack=false")
        if self.eval_only:
            require(self.init, "checkpoint", prefix="init.", fix="pass a reward-model checkpoint with eval_only=true")
        if not self.eval_only and self.data.val_fraction == 0:
            raise ConfigError("data.val_fraction", "must be > 0: the stored reward statistics are computed over "
                              "the validation responses", "use e.g. data.val_fraction=0.05")


PREFERENCE_METHODS = ("dpo", "ipo", "cdpo")  # trained on pairs with reference log-probs (`orlhf reference`)
ALIGN_METHODS = ("mle_filter", "rwr", "dt", *PREFERENCE_METHODS)


@dataclass
class AlignDataConfig(SequenceDataConfig):
    """The reward-labeled dataset (`orlhf mix` output): JSONL of {prompt, response, reward};
    for dpo, ipo and cdpo the pairs with reference log-probs (`orlhf reference` output)."""

    path: str = ""  # mle_filter/rwr/dt: the reward-labeled JSONL from `orlhf mix`
    reward_key: str = "reward"  # the normalized reward
    pairs: str = ""  # dpo/ipo/cdpo: the pairs with reference log-probs from `orlhf reference`
    # A record with a blank prompt or response is skipped and counted (the log's dataset line,
    # and the dataset card in each checkpoint's meta.json); strict makes it an error naming
    # file:line, as a malformed one is.
    strict: bool = False


@dataclass
class AlignConfig(TrainingStageConfig):
    """`orlhf align method=mle_filter|rwr|dt|dpo|ipo|cdpo`: offline alignment (paper Sec. 3.2,
    and preference optimization from pairs) into `run_dir/align_<method>/`, starting from
    the SFT checkpoint."""

    method: str = "dt"  # mle_filter, rwr, dt (paper Eqs. 4-6), dpo, ipo or cdpo
    filter_threshold: float = 0.0  # Eq. 4's t: train on samples with normalized reward > t
    rwr_beta: float = 5.0  # Eq. 5's beta
    rwr_normalize: bool = False  # divide by the weighted token count sum w_i n_i of the global batch
    dt_target: float = 5.0  # the reward prompt used at inference (stored with the checkpoint)
    beta: float = 0.1  # DPO/cDPO: the KL strength (sigmoid(beta h)); IPO: the margin target 1/(2 beta)
    label_smoothing: float = 0.1  # cdpo: the assumed share of flipped preference labels, in [0, 0.5)
    data: AlignDataConfig = field(default_factory=AlignDataConfig)

    def __post_init__(self):
        self.validate()
        if self.method not in ALIGN_METHODS:
            raise ConfigError("method", f"unknown method {self.method!r}", f"use one of {', '.join(ALIGN_METHODS)}")
        if self.rwr_beta <= 0:
            raise ConfigError("rwr_beta", f"must be > 0, got {self.rwr_beta}")
        if self.beta <= 0:
            raise ConfigError("beta", f"must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.method in PREFERENCE_METHODS:
            require(self.data, "pairs", prefix="data.", fix="pass the pairs written by `orlhf reference`")
        else:
            require(self.data, "path", prefix="data.", fix="pass the labeled JSONL written by `orlhf mix`")

    @property
    def stage_name(self) -> str:
        return f"align_{self.method}"

    @property
    def unread_inputs(self) -> tuple[str, ...]:
        """The input key this method does not read (`orlhf launch` checks only the other)."""
        return ("data.path",) if self.method in PREFERENCE_METHODS else ("data.pairs",)
