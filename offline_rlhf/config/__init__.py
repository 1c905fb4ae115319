"""Typed configs (dataclasses), Hydra composition and validation."""

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig, ParallelConfig, RopeScalingConfig

__all__ = ["ConfigError", "ModelConfig", "ParallelConfig", "RopeScalingConfig"]
