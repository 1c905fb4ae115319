"""One structured config per stage, built from the shared pieces in `schema.py`.

These dataclasses import no torch, so `orlhf STAGE --cfg` and the launcher-facing
validation stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig, ParallelConfig


@dataclass
class DemoConfig:
    """`orlhf demo`: build the model, train a few steps on synthetic tokens, checkpoint,
    reload and check the reloaded model gives the same logits."""

    run_dir: str = "runs/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    steps: int = 5
    batch_size: int = 4
    seq_len: int = 64
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError("seq_len", f"{self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
                              "lower seq_len or raise model.max_seq_len")


@dataclass
class ConvertConfig:
    """`orlhf convert import_hf hf_dir=... out=...` / `orlhf convert export_hf ckpt=... out=...`."""

    action: str = "import_hf"
    hf_dir: str = ""
    ckpt: str = ""
    out: str = ""
    head: str = "lm"  # "value" imports/exports a sequence-classification (reward) model
    dtype: str = "float32"

    def __post_init__(self):
        if self.action not in ("import_hf", "export_hf"):
            raise ConfigError("action", f"unknown action {self.action!r}", "use import_hf or export_hf")
        needed = ("hf_dir", "out") if self.action == "import_hf" else ("ckpt", "out")
        for key in needed:
            if not getattr(self, key):
                raise ConfigError(key, f"is required for {self.action}", f"pass {key}=PATH")
