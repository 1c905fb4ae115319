"""What a stage checks of its inputs before it loads a tensor: the tokenizer it starts
from against its model's vocabulary, its rows against the model's context. Torch-free, so
`orlhf STAGE --check` (the launcher runs it for every stage before anything is queued)
takes a fraction of a second, as the stage itself does at start."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from offline_rlhf.checkpoint_meta import TOKENIZER_DIR, resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import InitConfig, ModelConfig
from offline_rlhf.data.tokenizer import Tokenizer


@functools.cache
def note_once(message: str) -> None:
    """Print `message` once per process, from the first rank only (every rank of a job
    prepares the same stage)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


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
    """The stage's tokenizer, which must fit the model's vocabulary and name an EOS; one
    without a pad token pads with EOS (`Tokenizer.pad_with_eos`), as Llama 3's base needs."""
    path = tokenizer_dir(init)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.vocab_size > model.vocab_size:
        raise vocabulary_error(init, model, tokenizer.vocab_size, path)
    if tokenizer.eos_id is None:
        raise ConfigError("init.tokenizer", f"{path} defines no eos token (eos_token in tokenizer_config.json)",
                          "pass init.tokenizer=DIR, a tokenizer folder that names its eos_token")
    if tokenizer.pad_with_eos():
        note_once(f"init.tokenizer: {path} defines no pad token; padding with its eos token "
                  f"{tokenizer.backend.id_to_token(tokenizer.eos_id)!r} (padding is always masked)")
    return tokenizer, path


def vocabulary_error(init: InitConfig, model: ModelConfig, tokens: int, path: Path) -> ConfigError:
    """A tokenizer with more tokens than the model's embedding. With an init checkpoint the
    architecture is the checkpoint's (`model=` is ignored): the tokenizer is not its own."""
    if not init.checkpoint:
        return ConfigError("model.vocab_size", f"{model.vocab_size} is smaller than the tokenizer's {tokens} tokens "
                           f"({path})", f"set model.vocab_size >= {tokens}")
    if init.tokenizer:
        return ConfigError("init.tokenizer", f"{path} has {tokens} tokens, more than the {model.vocab_size} of "
                           f"{init.checkpoint}'s embedding: it is not this checkpoint's tokenizer",
                           "leave init.tokenizer unset to use the checkpoint's own, or pass the one it was "
                           "trained with")
    return ConfigError("init.tokenizer", f"{path}, the tokenizer saved with the checkpoint, has {tokens} tokens, more "
                       f"than the {model.vocab_size} of its embedding: they do not belong together",
                       "pass init.tokenizer=DIR, the tokenizer the model was trained with")


def check_sequence_length(config, model: ModelConfig | None) -> None:
    """Rows of `data.max_seq_len` tokens must fit the model the stage runs: past its
    max_seq_len the RoPE table runs out mid-training. `config.validate()` saw only `model=`."""
    limit = getattr(getattr(config, "data", None), "max_seq_len", None)
    if model is None or limit is None or limit <= model.max_seq_len:
        return
    source = "model" if getattr(config, "model", model) == model else "init.checkpoint's model"
    raise ConfigError("data.max_seq_len", f"{limit} exceeds max_seq_len={model.max_seq_len} of the {source}",
                      f"set data.max_seq_len<={model.max_seq_len}")
