"""`orlhf convert`: Hugging Face directory <-> our DCP checkpoint, in one CPU process.

import_hf: config.json + safetensors -> `out/step_00000000/` (fp32 master weights, the
           tokenizer files copied into its `tokenizer/`).
export_hf: a checkpoint root (its `latest`) or step directory -> config.json, safetensors
           in `dtype`, tokenizer files; loadable with `transformers.AutoModelFor*`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from offline_rlhf.checkpoint import (
    TOKENIZER_DIR,
    CheckpointMeta,
    TrainState,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig
from offline_rlhf.config.tools import ConvertConfig
from offline_rlhf.data.tokenizer import TOKENIZER_FILE, Tokenizer
from offline_rlhf.models.hf import (
    CONFIG_FILE,
    HFWeights,
    config_to_hf,
    copy_tokenizer_files,
    hf_state_dict,
    load_hf_weights,
    read_hf_config,
    write_hf_weights,
)
from offline_rlhf.models.llama import Transformer


def main(config: ConvertConfig) -> int:
    if config.action == "import_hf":
        if config.dtype != "float32":
            raise ConfigError("dtype", f"{config.dtype!r} applies to export_hf only",
                              "imported checkpoints hold float32 master weights; drop dtype")
        import_hf(config.hf_dir, config.out, config.head)
    else:
        export_hf(config.ckpt, config.out, config.head, config.dtype)
    return 0


def import_hf(hf_dir: str | Path, out: str | Path, head: str = "lm") -> Path:
    """Returns the checkpoint directory written under `out`."""
    cfg = read_hf_config(hf_dir)
    model = empty_model(cfg, head)
    load_hf_weights(model, HFWeights(hf_dir))
    meta = CheckpointMeta(model=cfg, head=head, train_state=TrainState(step=0))
    with tempfile.TemporaryDirectory() as staging:
        # save_checkpoint copies a whole folder; stage only the tokenizer files, not the weights.
        copied = copy_tokenizer_files(hf_dir, staging)
        path = save_checkpoint(out, model, meta, tokenizer_dir=staging if copied else None)
    print(f"imported {hf_dir} -> {path}: {_num_params(model):,} parameters, {cfg.n_layers} layers, "
          f"head={head}, tokenizer files {copied or 'none'}")
    return path


def export_hf(ckpt: str | Path, out: str | Path, head: str = "lm", dtype: str = "float32") -> Path:
    """`head` must match the checkpoint's head (a guard against exporting the wrong model)."""
    step_dir = resolve_checkpoint(ckpt)
    meta = read_meta(step_dir)
    if meta.head != head:
        raise ConfigError("head", f"{step_dir} holds a {meta.head!r} head, not {head!r}", f"pass head={meta.head}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("out", f"{out} exists and is not empty", "choose a new directory (stale shards would mix in)")
    model = empty_model(meta.model, meta.head)
    load_checkpoint(step_dir, model)
    tokenizer_dir = step_dir / TOKENIZER_DIR
    hf_config = config_to_hf(meta.model, meta.head, dtype, extra=special_token_ids(tokenizer_dir))
    files = write_hf_weights(hf_state_dict(model, dtype), out)
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    copied = copy_tokenizer_files(tokenizer_dir, out) if tokenizer_dir.is_dir() else []
    print(f"exported {step_dir} -> {out}: {_num_params(model):,} parameters, {meta.model.n_layers} layers, "
          f"{hf_config['architectures'][0]}, {dtype}, {len(files)} weight file(s), tokenizer files {copied or 'none'}")
    return out


def empty_model(cfg: ModelConfig, head: str) -> Transformer:
    """A CPU fp32 model with uninitialized weights: every parameter is about to be loaded,
    so random init (minutes for 8B) would be wasted."""
    with torch.device("meta"):
        model = Transformer(cfg, head)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_buffers("cpu")
    return model


def special_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """bos/eos/pad token ids for config.json, from the tokenizer when there is one."""
    if not (tokenizer_dir / TOKENIZER_FILE).is_file():
        return {}
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return {key: value for key, value in ids.items() if value is not None}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
