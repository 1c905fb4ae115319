"""Where a training stage's model and starting weights come from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from offline_rlhf.checkpoint import latest_checkpoint, load_checkpoint, read_meta, resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import InitConfig, ModelConfig
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.parallel.parallelize import build_model
from offline_rlhf.runtime import Runtime
from offline_rlhf.stage_checks import load_tokenizer
from offline_rlhf.stage_support import note_untrusted

# What an init checkpoint of the other head (an SFT model for a reward model) cannot hold.
NEW_HEAD_PARAMETERS = {"lm": (), "value": ("score.weight",)}
# launcher.plan.HEAD_NAMES repeats it (the launcher imports no offline_rlhf; a test keeps the two equal).
HEAD_NAMES = {"lm": "a language model (lm head)", "value": "a reward model (value head)"}


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
    check_init_head(init, head, rt.stage_dir.name)
    tokenizer, tokenizer_path = load_tokenizer(init, model_cfg)
    model = build_model(model_cfg, head, rt.dims, rt.mesh, rt.device, seed=seed)
    if before_load is not None:
        before_load(model)
    checkpoints = rt.stage_dir / "checkpoints"
    source = initialize_weights(init, model, checkpoints, may_lack=NEW_HEAD_PARAMETERS[head], rt=rt)
    if source is not None:
        rt.log(source)
    return TrainingSetup(model, tokenizer, tokenizer_path, checkpoints)


def check_init_head(init: InitConfig, head: str, stage: str) -> None:
    """A language model may start a reward model (its new value head starts random), but a
    reward model cannot start a language model: it has no lm head to generate with."""
    if not init.checkpoint or head != "lm":
        return
    path = resolve_checkpoint(init.checkpoint, "init.checkpoint")
    theirs = read_meta(path).head
    if theirs != head:
        raise ConfigError("init.checkpoint", f"{path} is {HEAD_NAMES[theirs]}; {stage} needs {HEAD_NAMES[head]}",
                          "pass an SFT, aligned or imported language-model checkpoint")


def initialize_weights(init: InitConfig, model: nn.Module, resume_root: Path, may_lack: tuple[str, ...] = (),
                       rt: Runtime | None = None) -> str | None:
    """Load the init checkpoint unless the stage is resuming (its own checkpoint wins).
    Returns a line saying where the weights came from; None on a resume, which the
    training loop reports itself (`resuming from <checkpoint> (step N)`)."""
    if latest_checkpoint(resume_root) is not None:
        return None
    if not init.checkpoint:
        return "weights: random initialization"
    path = resolve_checkpoint(init.checkpoint, "init.checkpoint")
    if rt is not None:
        note_untrusted(path, rt)
    load_checkpoint(path, model, may_lack=may_lack, group=rt.group if rt else None)
    return f"weights: {path}"
