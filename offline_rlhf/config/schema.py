"""Structured configs shared by every stage.

Each stage config is a dataclass composed of these pieces; Hydra merges YAML from
`conf/` into them in struct mode, so an unknown key is an error. Per-piece checks live
in `__post_init__`; checks that need the world size live in `ParallelDims`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from offline_rlhf.config.errors import ConfigError


@dataclass
class RopeScalingConfig:
    """Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass
class ModelConfig:
    """A Llama-family decoder. Defaults are the paper's 8B attributes (SwiGLU, RoPE,
    max sequence 4096, no dropout, no biases, untied embeddings)."""

    name: str = "custom"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: multi-head attention (n_kv_heads == n_heads)
    head_dim: Optional[int] = None  # None: dim // n_heads
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    max_seq_len: int = 4096
    qkv_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}", f"must be positive, got {getattr(self, key)}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(
                "model.n_kv_heads",
                f"{self.n_kv_heads} does not divide model.n_heads={self.n_heads}",
                "choose a divisor of n_heads (grouped-query attention)",
            )
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError("model.dim", f"{self.dim} is not divisible by model.n_heads={self.n_heads}",
                              "set model.head_dim explicitly")
        if self.resolved_head_dim % 2:
            raise ConfigError("model.head_dim", f"must be even for rotary embeddings, got {self.resolved_head_dim}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def num_params(self, head: str = "lm") -> int:
        """Parameter count, used for analytic FLOPs and reports."""
        hd = self.resolved_head_dim
        attn = self.dim * hd * (self.n_heads * 2 + self.kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        embed = self.vocab_size * self.dim
        out = 0 if head == "lm" and self.tie_embeddings else (self.vocab_size if head == "lm" else 1) * self.dim
        return embed + self.n_layers * per_layer + self.dim + out


@dataclass
class ParallelConfig:
    """How the world is split. `dp=-1` fills whatever the world size leaves after TP."""

    tp: int = 1
    dp: int = -1
    dp_mode: str = "fsdp"  # fsdp (FSDP2 fully_shard) or ddp
    sequence_parallel: bool = False
    loss_parallel: bool = False
    activation_checkpointing: bool = False
    compile: bool = False

    def __post_init__(self):
        if self.tp < 1:
            raise ConfigError("parallel.tp", f"must be >= 1, got {self.tp}")
        if self.dp == 0 or self.dp < -1:
            raise ConfigError("parallel.dp", f"must be >= 1 or -1 (fill the world), got {self.dp}")
        if self.dp_mode not in ("fsdp", "ddp"):
            raise ConfigError("parallel.dp_mode", f"unknown mode {self.dp_mode!r}", "use 'fsdp' or 'ddp'")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel", "needs parallel.tp > 1",
                              "set parallel.tp or turn sequence_parallel off")
