"""What a checkpoint folder says without its tensors: which step `latest` names, whether a
step is complete, its metadata (`meta.json`: model config, head, progress, stage extras).
Torch-free, so `orlhf STAGE --check`, which the launcher runs for every stage, reads
checkpoints without loading torch; `offline_rlhf.checkpoint` saves and loads the tensors
(the layout is described there)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig, RopeScalingConfig

LATEST = "latest"
TOKENIZER_DIR = "tokenizer"
CONFIG_KEY = "config"  # metadata: the resume fingerprint (train.loop), a training run's settings
TEMPLATE = "template"  # metadata: how the model's conversations are rendered (data.chat_template.template_record)
# metadata of a reward model (`orlhf rm`): the mean and std of its validation scores, which
# z-score its rewards; an export to Hugging Face carries them in config.json under this key
REWARD_STATS = "reward_stats"
META = "meta.json"
PARTIAL_SUFFIX = ".partial"


@dataclass
class TrainState:
    """Progress that is not a tensor: where training stands and where the data reader is."""

    step: int = 0
    tokens_seen: int = 0
    data_position: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointMeta:
    model: ModelConfig
    head: str
    train_state: TrainState
    scheduler: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # stage extras, e.g. reward statistics
    world_size: int = 1
    has_optimizer: bool = False


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        steps = sorted(p.name for p in Path(root).glob("step_*") if is_complete(p))
        if steps:  # a fresh start here would prune them and could lose its own newest save
            raise ConfigError(str(pointer), f"is missing, but {root} holds complete checkpoints ({', '.join(steps)})",
                              f"write the name of the one to resume from (the newest: {steps[-1]}) into {pointer}, "
                              f"or delete {root} to start over")
        return None
    path = Path(root) / pointer.read_text().strip()
    if not is_complete(path):  # a config-level error: one line, not a traceback
        raise ConfigError(str(pointer), f"names {path.name}, which is not a complete checkpoint (missing {META} or "
                          "DCP .metadata): the folder was modified after saving",
                          f"write the name of a complete step_* folder into it, or delete {root} to start over")
    return path


def resolve_checkpoint(ckpt: str | Path, key: str = "ckpt") -> Path:
    """A step directory as given, or the one a checkpoint root's `latest` names; `key` is the
    config key the path came from, for the error message."""
    path = Path(ckpt)
    if is_complete(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ConfigError(key, f"{path} is neither a checkpoint step directory nor a root with a 'latest' file",
                          "pass a run's checkpoint folder or one of its step_* folders")
    return latest


def is_complete(path: Path) -> bool:
    return (path / META).is_file() and (path / ".metadata").is_file() and not path.name.endswith(PARTIAL_SUFFIX)


def read_meta(path: str | Path) -> CheckpointMeta:
    raw = json.loads((Path(path) / META).read_text())
    model = dict(raw.pop("model"))
    if model.get("rope_scaling"):
        model["rope_scaling"] = RopeScalingConfig(**model["rope_scaling"])
    return CheckpointMeta(model=ModelConfig(**model), train_state=TrainState(**raw.pop("train_state")), **raw)


def checkpoint_of_head(path: Path, head: str, key: str) -> CheckpointMeta:
    """The metadata of the checkpoint at `path`, which must hold a `head` model. `key` is
    the config key the path came from, for the error message."""
    meta = read_meta(path)
    if meta.head != head:
        wanted = "a reward model's 'value'" if head == "value" else "a language model's 'lm'"
        fix = ("pass an `orlhf rm` checkpoint (or one imported with head=value)" if head == "value"
               else "pass an SFT, aligned or imported language-model checkpoint")
        raise ConfigError(key, f"{path} holds a {meta.head!r} head, not {wanted} head", fix)
    return meta
