"""Where a training stage's weights and tokenizer come from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from offline_rlhf.checkpoint import TOKENIZER_DIR, latest_checkpoint, load_checkpoint, read_meta, resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig
from offline_rlhf.config.stages import InitConfig
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.parallel.parallelize import build_model
from offline_rlhf.runtime import Runtime
from offline_rlhf.tokenizer import Tokenizer


def model_config(init: InitConfig, configured: ModelConfig) -> ModelConfig:
    """An init checkpoint fixes the architecture; `model=` applies to random init only."""
    return read_meta(resolve_checkpoint(init.checkpoint, "init.checkpoint")).model if init.checkpoint else configured


def tokenizer_dir(init: InitConfig) -> Path:
    if init.tokenizer:
        return Path(init.tokenizer)
    if init.checkpoint:
        candidate = resolve_checkpoint(init.checkpoint, "init.checkpoint") / TOKENIZER_DIR
        if candidate.is_dir():
            return candidate
        raise ConfigError("init.tokenizer", f"{init.checkpoint} has no {TOKENIZER_DIR}/ folder",
                          "pass init.tokenizer=DIR (a folder with tokenizer.json)")
    raise ConfigError("init.tokenizer", "is required when training from random weights",
                      "pass init.tokenizer=DIR or init.checkpoint=CKPT")


def load_tokenizer(init: InitConfig, model: ModelConfig) -> tuple[Tokenizer, Path]:
    path = tokenizer_dir(init)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError("model.vocab_size", f"{model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens ({path})", f"set model.vocab_size >= {tokenizer.vocab_size}")
    if tokenizer.eos_id is None or tokenizer.pad_id is None:
        raise ConfigError("init.tokenizer", f"{path} defines no eos or pad token", "add them to tokenizer_config.json")
    return tokenizer, path


# What an init checkpoint of the other head (an SFT model for a reward model) cannot hold.
NEW_HEAD_PARAMETERS = {"lm": (), "value": ("score.weight",)}


@dataclass
class TrainingSetup:
    model: nn.Module
    tokenizer: Tokenizer
    tokenizer_path: Path
    checkpoints: Path  # this stage's checkpoint root: resuming reads it, training writes it


def prepare_training(init: InitConfig, model_cfg: ModelConfig, head: str, rt: Runtime, seed: int,
                     before_load: Callable[[nn.Module], None] | None = None) -> TrainingSetup:
    """Tokenizer, model in the runtime's layout, and its starting weights: the stage's own
    checkpoint when resuming, else `init.checkpoint` (partially for a new value head),
    else the seeded random init. `before_load` runs between building and loading."""
    tokenizer, tokenizer_path = load_tokenizer(init, model_cfg)
    model = build_model(model_cfg, head, rt.dims, rt.mesh, rt.device, seed=seed)
    if before_load is not None:
        before_load(model)
    checkpoints = rt.stage_dir / "checkpoints"
    rt.log(initialize_weights(init, model, checkpoints, may_lack=NEW_HEAD_PARAMETERS[head]))
    return TrainingSetup(model, tokenizer, tokenizer_path, checkpoints)


# Keys that may change between a run and its resumption: layout (checkpoints reshard),
# logging, and how long or how often things happen.
RESUMABLE_CHANGES = ("run_dir", "parallel.", "logging.", "train.max_steps", "train.epochs", "train.val_every",
                     "train.val_batches", "train.save_every", "train.keep_last", "train.log_every", "write_every")


def resume_fingerprint(cfg) -> dict[str, object]:
    """The config values a checkpoint (or a partial output) was made under, flattened to
    dotted keys, without the ones a resumed run may change."""
    return {key: value for key, value in flatten(asdict(cfg)).items()
            if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)}


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(saved: dict | None, current: dict, where: Path) -> None:
    """A rerun may continue an earlier one only under the same config (apart from
    RESUMABLE_CHANGES); otherwise it would silently mix two experiments."""
    if saved is None:
        return
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        raise ConfigError(changed[0], f"differs from the run that wrote {where} ({len(changed)} changed: "
                          f"{', '.join(changed[:4])}{'...' if len(changed) > 4 else ''})",
                          f"restore it, or delete {where} to start this stage over")


def mark_done(rt: Runtime, result: str | Path) -> None:
    """The stage's last write: its outputs are complete (pipelines skip it on a rerun)."""
    if rt.is_main:
        write_atomic(rt.stage_dir / "DONE", f"{result}\n")


def initialize_weights(init: InitConfig, model: nn.Module, resume_root: Path, may_lack: tuple[str, ...] = ()) -> str:
    """Load the init checkpoint unless the stage is resuming (its own checkpoint wins).
    Returns a line saying where the weights came from."""
    if latest_checkpoint(resume_root) is not None:
        return f"weights: resuming from {resume_root}"
    if not init.checkpoint:
        return "weights: random initialization"
    path = resolve_checkpoint(init.checkpoint, "init.checkpoint")
    load_checkpoint(path, model, may_lack=may_lack)
    return f"weights: {path}"
