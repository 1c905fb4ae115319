"""Generation settings (no torch import: stage configs embed this dataclass)."""

from __future__ import annotations

from dataclasses import dataclass

from offline_rlhf.config.errors import ConfigError


@dataclass
class GenerationConfig:
    """`greedy` takes the argmax and ignores the sampling fields. Otherwise logits are
    divided by `temperature`, cut to the `top_k` most likely tokens (0: no cut) and then to
    the nucleus of mass `top_p` (1.0: no cut), and sampled with a torch.Generator seeded
    with `seed`. `batch_size` prompts run together, grouped by length."""

    max_new_tokens: int = 256
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError("generation.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError("generation.temperature", f"must be > 0, got {self.temperature}",
                              "use greedy=true for argmax decoding")
        if not 0 < self.top_p <= 1:
            raise ConfigError("generation.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError("generation.top_k", f"must be >= 0 (0: off), got {self.top_k}")
        if self.batch_size < 1:
            raise ConfigError("generation.batch_size", f"must be >= 1, got {self.batch_size}")
