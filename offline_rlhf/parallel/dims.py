"""The validated split of the world into data- and tensor-parallel dimensions.

Built once at start-up and passed explicitly; there is no global group state.
"""

from __future__ import annotations

from dataclasses import dataclass

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig, ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    dp_mode: str = "fsdp"
    sequence_parallel: bool = False
    loss_parallel: bool = False
    activation_checkpointing: bool = False
    compile: bool = False

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    @property
    def sequence_multiple(self) -> int:
        """Sequence lengths must be multiples of this: sequence parallelism splits each
        sequence evenly over the TP ranks."""
        return self.tp if self.sequence_parallel else 1

    def per_rank_batch(self, global_batch: int, micro_batch: int) -> int:
        """Samples each data-parallel rank takes per optimizer step: the global batch must
        split into whole micro-batches on every rank (the loop and `orlhf STAGE --check`)."""
        if global_batch % (self.dp * micro_batch):
            raise ConfigError("train.global_batch", f"{global_batch} is not divisible by train.micro_batch="
                              f"{micro_batch} x data-parallel size {self.dp}",
                              f"use a multiple of {self.dp * micro_batch}")
        return global_batch // self.dp

    @classmethod
    def build(cls, cfg: ParallelConfig, world_size: int, model: ModelConfig | None = None) -> "ParallelDims":
        dp = world_size // cfg.tp if cfg.dp == -1 else cfg.dp
        if world_size % cfg.tp:
            raise ConfigError("parallel.tp", f"{cfg.tp} does not divide the world size {world_size}",
                              f"launch a multiple of {cfg.tp} processes or change parallel.tp")
        if dp * cfg.tp != world_size:
            raise ConfigError("parallel.dp",
                              f"tp={cfg.tp} x dp={dp} = {cfg.tp * dp} but the world size is {world_size}",
                              f"set parallel.dp={world_size // cfg.tp} or parallel.dp=-1")
        if cfg.dp_mode == "ddp" and cfg.tp > 1:
            raise ConfigError("parallel.dp_mode", "ddp cannot be combined with tensor parallelism",
                              "use parallel.dp_mode=fsdp with parallel.tp > 1")
        if model is not None:
            _check_model_divisible(cfg.tp, model)
        return cls(dp=dp, tp=cfg.tp, dp_mode=cfg.dp_mode, sequence_parallel=cfg.sequence_parallel,
                   loss_parallel=cfg.loss_parallel, activation_checkpointing=cfg.activation_checkpointing,
                   compile=cfg.compile)


def _check_model_divisible(tp: int, model: ModelConfig) -> None:
    """Each TP rank must hold whole heads, whole KV heads and equal slices of the MLP and vocabulary."""
    for key, size in (("n_heads", model.n_heads), ("n_kv_heads", model.kv_heads),
                      ("ffn_dim", model.ffn_dim), ("vocab_size", model.vocab_size)):
        if size % tp:
            raise ConfigError("parallel.tp", f"{tp} does not divide model.{key}={size}",
                              f"choose a parallel.tp that divides {size}")
