"""What the stages share below their `main`s: where a stage's architecture, tokenizer and
weights come from, the resume fingerprint that keeps a rerun from mixing two experiments,
and the DONE marker that ends a stage."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from torch import nn

from offline_rlhf.checkpoint import TOKENIZER_DIR, CheckpointMeta, load_checkpoint, read_meta, resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import InitConfig, ModelConfig
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.parallel.parallelize import build_inference_model
from offline_rlhf.runtime import DONE, Runtime


def model_config(init: InitConfig, configured: ModelConfig) -> ModelConfig:
    """An init checkpoint fixes the architecture; `model=` applies to random init only."""
    return read_meta(resolve_checkpoint(init.checkpoint, "init.checkpoint")).model if init.checkpoint else configured


def tokenizer_dir(init: InitConfig) -> Path:
    init.require_tokenizer_source()
    if init.tokenizer:
        return Path(init.tokenizer)
    candidate = resolve_checkpoint(init.checkpoint, "init.checkpoint") / TOKENIZER_DIR
    if candidate.is_dir():
        return candidate
    raise ConfigError("init.tokenizer", f"{init.checkpoint} has no {TOKENIZER_DIR}/ folder",
                      "pass init.tokenizer=DIR (a folder with tokenizer.json)")


def load_tokenizer(init: InitConfig, model: ModelConfig) -> tuple[Tokenizer, Path]:
    path = tokenizer_dir(init)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError("model.vocab_size", f"{model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens ({path})", f"set model.vocab_size >= {tokenizer.vocab_size}")
    if tokenizer.eos_id is None or tokenizer.pad_id is None:
        raise ConfigError("init.tokenizer", f"{path} defines no eos or pad token", "add them to tokenizer_config.json")
    return tokenizer, path


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


def load_inference_model(path: Path, head: str, rt: Runtime, key: str) -> nn.Module:
    """The checkpoint at `path` (resolved) in eval mode as a TP-only replica of the
    runtime's layout: replicas then generate independently (FSDP would make every
    replica run the same number of forwards)."""
    meta = checkpoint_of_head(path, head, key)
    model = build_inference_model(meta.model, head, rt.dims, rt.mesh, rt.device)
    note_untrusted(path, rt)
    load_checkpoint(path, model, group=rt.group)
    return model.eval()


def note_untrusted(path: Path, rt: Runtime) -> None:
    """DCP reads a checkpoint's `.metadata` with pickle, so loading one runs whatever code it
    names: say so when the checkpoint was not written inside this run directory."""
    run_dir = rt.stage_dir.parent.resolve()
    if not Path(path).resolve().is_relative_to(run_dir):
        rt.log(f"loading {path}, a checkpoint from outside this run ({run_dir}): checkpoints are unpickled, "
               "so load only ones you trust (exchange weights as Hugging Face safetensors)")


# Keys that may change between a run and its resumption: layout (checkpoints reshard),
# logging, and how long or how often things happen.
RESUMABLE_CHANGES = ("run_dir", "parallel.", "logging.", "train.max_steps", "train.epochs", "train.val_every",
                     "train.val_batches", "train.save_every", "train.keep_last", "train.log_every",
                     "train.max_skipped_fraction", "write_every", "ppo.iterations", "save_every", "keep_last")


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
    # Keys only one side has came with a newer or older version of the project, not the user.
    changed = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
    if changed:
        raise ConfigError(changed[0], f"differs from the run that wrote {where} ({len(changed)} changed: "
                          f"{', '.join(changed[:4])}{'...' if len(changed) > 4 else ''})",
                          f"restore it, or delete {where} to start this stage over")


def mark_done(rt: Runtime, result: str | Path) -> None:
    """The stage's last write: its outputs are complete (pipelines skip it on a rerun)."""
    if rt.is_main:
        write_atomic(rt.stage_dir / DONE, f"{result}\n")
