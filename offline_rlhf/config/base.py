"""What every config dataclass shares: frozen after validation, and one-line checks."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import TypeVar

from offline_rlhf.config.errors import ConfigError

T = TypeVar("T")

# Seeds are 32-bit: stages derive per-step seeds from them (seed * 1_000_003 + step, ...) that
# torch.manual_seed must still take (its range is 64 bits), and numpy-style seeders want >= 0.
SEED_MAX = 2**32 - 1
# The most records, prompts or pairs a total may ask for: more is a typo that would build a
# list for hours before failing for memory (the data itself is only read later).
MAX_TOTAL = 10**9
WEEK_S = 7 * 24 * 3600  # the longest timeout a config may set (a socket's or a collective's)


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


def require_at_most(config, limit: float, *keys: str, prefix: str = "", fix: str = "") -> None:
    for key in keys:
        if getattr(config, key) > limit:
            raise ConfigError(f"{prefix}{key}", f"must be <= {limit}, got {getattr(config, key)}", fix)


def require_seed(config, key: str = "seed", prefix: str = "") -> None:
    """Every seed key: 0..SEED_MAX (a larger or negative one fails in torch or numpy, late)."""
    value = getattr(config, key)
    if not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{prefix}{key}", f"must be in 0..{SEED_MAX}, got {value}", "use a 32-bit seed, e.g. 1234")


def require_total(config, key: str, prefix: str = "", fix: str = "") -> None:
    """An optional count of records to draw (None: every one once): 1..MAX_TOTAL."""
    value, fix = getattr(config, key), fix or f"set {prefix}{key}=null for every record once"
    if value is None:
        return
    if value < 1:
        raise ConfigError(f"{prefix}{key}", f"must be >= 1 or null, got {value}", fix)
    require_at_most(config, MAX_TOTAL, key, prefix=prefix, fix=fix)


def require_run_dir(config) -> None:
    """A stage's run folder: empty, `run_dir/<stage>` would be `./<stage>` and `${run_dir}/x` be `/x`."""
    if not config.run_dir.strip():
        raise ConfigError("run_dir", "is empty", "pass run_dir=DIR, the run folder")


def settable_fields(schema: type) -> dict[str, type]:
    """The keys a config dataclass takes and their types: its fields, with string
    annotations resolved; not class-level constants (`checkpoint_heads`) or private names."""
    hints = typing.get_type_hints(schema)
    return {item.name: hints[item.name] for item in dataclasses.fields(schema) if not item.name.startswith("_")}
