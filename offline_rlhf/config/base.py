"""What every config dataclass shares: frozen after validation, and one-line checks."""

from __future__ import annotations

import dataclasses
import math
from typing import TypeVar

from offline_rlhf.config.errors import ConfigError

T = TypeVar("T")


class Frozen:
    """A config that `freeze()` has sealed refuses assignment: a stage runs under exactly
    the settings it validated and recorded in its config.yaml."""

    def __setattr__(self, name: str, value) -> None:
        if getattr(self, "_frozen", False):
            raise dataclasses.FrozenInstanceError(f"cannot assign {name!r}: configs are frozen after validation")
        object.__setattr__(self, name, value)


def freeze(config: T) -> T:
    """Seal `config` and every config dataclass inside it (fields, lists, dicts)."""
    if dataclasses.is_dataclass(config):
        for item in dataclasses.fields(config):
            freeze(getattr(config, item.name))
        if isinstance(config, Frozen):
            object.__setattr__(config, "_frozen", True)
    elif isinstance(config, (list, tuple)):
        for value in config:
            freeze(value)
    elif isinstance(config, dict):
        for value in config.values():
            freeze(value)
    return config


def require(config, *keys: str, prefix: str = "", fix: str = "") -> None:
    """Each of `keys` must be set (non-empty): the common 'is required' check."""
    for key in keys:
        if not getattr(config, key):
            raise ConfigError(f"{prefix}{key}", "is required", fix or f"pass {prefix}{key}=...")


def require_finite(config: T, prefix: str = "") -> T:
    """Every float of `config` (nested configs, lists and dicts included) must be finite:
    `optim.lr=inf` or `rwr_beta=nan` pass every `<= 0` check (comparisons with NaN are
    false) and would train silently on NaN. Keys are named as an override spells them."""
    if dataclasses.is_dataclass(config):
        items = [(item.name, getattr(config, item.name)) for item in dataclasses.fields(config)]
    elif isinstance(config, (list, tuple)):
        items = list(enumerate(config))
    elif isinstance(config, dict):
        items = list(config.items())
    else:
        if isinstance(config, float) and not math.isfinite(config):
            raise ConfigError(prefix.rstrip(".") or "config", f"must be a finite number, got {config}")
        return config
    for name, value in items:
        require_finite(value, f"{prefix}{name}.")
    return config


def require_positive(config, *keys: str, prefix: str = "") -> None:
    for key in keys:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{prefix}{key}", f"must be positive, got {getattr(config, key)}")


def require_non_negative(config, *keys: str, prefix: str = "") -> None:
    for key in keys:
        if getattr(config, key) < 0:
            raise ConfigError(f"{prefix}{key}", f"must be >= 0, got {getattr(config, key)}")
