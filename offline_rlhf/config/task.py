"""`orlhf task`: generate the embedded task (see `offline_rlhf.data.embedded_task`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.data.embedded_task import FLAWS, max_eval_prompts


def _even_flaws() -> dict[str, float]:
    return dict.fromkeys(FLAWS, 1.0)


@dataclass
class TaskConfig:
    """Sizes and noise of the generated task; outputs go to `run_dir/task/`.

    SFT demonstrations are `good_fraction` good, the rest flawed in proportion to
    `flaw_weights` (wrong, truncated, off_topic, rambling). Preference labels follow
    Bradley-Terry on the gold rewards with `bt_temperature` (small: nearly always the
    better response; large: a coin flip).
    """

    run_dir: str = "runs/demo"
    seed: int = 0
    n_sft: int = 2000
    n_preferences: int = 2000
    n_gen_prompts: int = 600
    n_eval_prompts: int = 200
    good_fraction: float = 0.4
    flaw_weights: dict[str, float] = field(default_factory=_even_flaws)
    bt_temperature: float = 0.5
    vocab_size: int = 512

    def __post_init__(self):
        for key in ("n_sft", "n_preferences", "n_gen_prompts", "n_eval_prompts"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.n_eval_prompts > max_eval_prompts():
            raise ConfigError("n_eval_prompts", f"{self.n_eval_prompts} exceeds the {max_eval_prompts()} "
                              "instructions that can be held out", f"use at most {max_eval_prompts()}")
        if not 0.0 <= self.good_fraction <= 1.0:
            raise ConfigError("good_fraction", f"must be in [0, 1], got {self.good_fraction}")
        self._check_flaw_weights()
        if self.bt_temperature <= 0:
            raise ConfigError("bt_temperature", f"must be > 0, got {self.bt_temperature}")
        # 256 byte symbols and 3 special tokens come first; the rest are merges.
        if self.vocab_size < 300:
            raise ConfigError("vocab_size", f"must be >= 300, got {self.vocab_size}",
                              "the byte alphabet and special tokens take 259 ids")

    def _check_flaw_weights(self):
        unknown = sorted(set(self.flaw_weights) - set(FLAWS))
        if unknown:
            raise ConfigError(f"flaw_weights.{unknown[0]}", "unknown flaw", f"use {', '.join(FLAWS)}")
        if any(weight < 0 for weight in self.flaw_weights.values()) or sum(self.flaw_weights.values()) <= 0:
            raise ConfigError("flaw_weights", f"weights must be >= 0 with a positive sum, got {self.flaw_weights}")
