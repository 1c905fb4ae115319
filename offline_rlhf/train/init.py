"""Where a training stage's weights and tokenizer come from."""

from __future__ import annotations

from dataclasses import dataclass
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
    rt.log(initialize_weights(init, model, checkpoints, partial=head == "value"))
    return TrainingSetup(model, tokenizer, tokenizer_path, checkpoints)


def mark_done(rt: Runtime, result: str | Path) -> None:
    """The stage's last write: its outputs are complete (pipelines skip it on a rerun)."""
    if rt.is_main:
        write_atomic(rt.stage_dir / "DONE", f"{result}\n")


def initialize_weights(init: InitConfig, model: nn.Module, resume_root: Path, partial: bool = False) -> str:
    """Load the init checkpoint unless the stage is resuming (its own checkpoint wins).
    Returns a line saying where the weights came from."""
    if latest_checkpoint(resume_root) is not None:
        return f"weights: resuming from {resume_root}"
    if not init.checkpoint:
        return "weights: random initialization"
    path = resolve_checkpoint(init.checkpoint, "init.checkpoint")
    load_checkpoint(path, model, partial=partial)
    return f"weights: {path}"
