"""Tokenizers through the `tokenizers` library, stored as Hugging Face files.

A tokenizer directory holds `tokenizer.json` and, when present, `tokenizer_config.json`
naming the bos/eos/pad tokens, so `transformers.AutoTokenizer` loads the same directory.
Special tokens only an older `special_tokens_map.json` names, and the extra end-of-sequence
ids of a model's `generation_config.json` beside them, are read as transformers reads them.
Special tokens are added explicitly (`add_bos`), never by a post-processor, so what a
sequence starts with is decided by our data code alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from offline_rlhf.config.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # a chat template saved on its own (transformers >= 4.50)
GENERATION_CONFIG_FILE = "generation_config.json"  # a model's generation defaults, copied beside its tokenizer
ROLES = ("bos_token", "eos_token", "pad_token")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the names of its bos/eos/pad tokens (None when absent)
    and `generation_eos_ids`, the ids generation_config.json also ends a generation at."""

    def __init__(self, backend: BackendTokenizer, config: dict | None = None, generation_eos_ids: tuple[int, ...] = ()):
        self.backend = backend
        # The rest of tokenizer_config.json (chat template...) is kept so `save` loses nothing.
        self.config = dict(config or {})
        self.generation_eos_ids = generation_eos_ids

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not (path / TOKENIZER_FILE).is_file():
            raise ConfigError("init.tokenizer", f"{path / TOKENIZER_FILE} not found",
                              "pass a folder with a tokenizer.json (only those tokenizers are supported)")
        config_path = path / CONFIG_FILE
        config = _json_object(config_path) if config_path.is_file() else {}
        if "chat_template" not in config and (path / CHAT_TEMPLATE_FILE).is_file():
            config["chat_template"] = (path / CHAT_TEMPLATE_FILE).read_text()  # transformers >= 4.50 saves it there
        config.update(_legacy_special_tokens(path, config))
        try:
            backend = BackendTokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as err:  # noqa: BLE001 - the Rust library raises a bare Exception for a damaged file
            raise ConfigError("init.tokenizer", f"{path / TOKENIZER_FILE} is not a tokenizer the tokenizers library "
                              f"reads ({err})", "restore the file, or point at another tokenizer folder") from None
        return cls(backend, config, _generation_eos_ids(path / GENERATION_CONFIG_FILE,
                                                         backend.get_vocab_size(with_added_tokens=True)))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Special-token strings inside `text` map to their ids (as in transformers)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but the tokenizer defines no bos_token")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def adds_bos(self) -> bool:
        """Whether sequences start with BOS for this model: tokenizer_config.json's
        `add_bos_token` when it says, else whether tokenizer.json's post-processor adds it
        (Llama 3's does; `encode` never runs the post-processor, so this asks it directly)."""
        if "add_bos_token" in self.config:
            return bool(self.config["add_bos_token"]) and self.bos_id is not None
        bos_id = self.bos_id
        return bos_id is not None and self._post_processor_start() == [bos_id]

    def _post_processor_start(self) -> list[int]:
        """The first id of "a" encoded through tokenizer.json's post-processor, asked of the
        backend once per post-processor: `adds_bos` is read for every prompt encoded. The
        backend, and its post-processor (replaceable in place) in serialized form, key it."""
        processor = self.backend.post_processor
        key = (self.backend, None if processor is None else processor.__getstate__())
        cache = self.__dict__.setdefault("_post_processor_starts", {})
        if key not in cache:
            cache[key] = self.backend.encode("a", add_special_tokens=True).ids[:1]
        return cache[key]

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad_token")

    def pad_with_eos(self) -> bool:
        """Without a pad token, pad with EOS (in memory only: the files stay as they are), and
        say whether it did, for the caller to log. Padding is masked wherever it is made:
        batches give it a document id of its own (attention, labels, the reward's read
        position ignore it), generation's left padding is outside its `real` mask."""
        if self.pad_id is not None or self.eos_id is None:
            return False
        self.config["pad_token"] = self.config["eos_token"]
        return True

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _special_id(self, role: str) -> int | None:
        token = _token_content(self.config.get(role))
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{CONFIG_FILE}: {role} {token!r} is not in the vocabulary")
        return token_id

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / TOKENIZER_FILE))
        (path / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        special = {role: self.config[role] for role in ROLES if self.config.get(role) is not None}
        (path / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError("init.tokenizer", f"{path} is not valid JSON ({err})", "restore the file") from None
    if not isinstance(value, dict):
        raise ConfigError("init.tokenizer", f"{path} is not a JSON object", "restore the file")
    return value


def _legacy_special_tokens(path: Path, config: dict) -> dict:
    """The special tokens (`bos_token`, `eos_token`...) of special_tokens_map.json, which
    transformers reads, over tokenizer_config.json's, when tokenizer_config.json has no
    `added_tokens_decoder` (older saves, and transformers 5's); otherwise it ignores the file."""
    special_map = path / SPECIAL_TOKENS_MAP_FILE
    if "added_tokens_decoder" in config or not special_map.is_file():
        return {}
    return {key: value for key, value in _json_object(special_map).items()
            if key.endswith("_token") and value is not None}


def _generation_eos_ids(path: Path, vocab_size: int) -> tuple[int, ...]:
    """generation_config.json's `eos_token_id` (an id or a list; Qwen2.5-Instruct's lists
    <|im_end|> and <|endoftext|>, Llama 3.1 Instruct's three ids), every one a token of
    this tokenizer; () without the file or the key."""
    if not path.is_file():
        return ()
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (ValueError, AttributeError) as error:
        raise ConfigError(str(path), f"is not a JSON object ({error})", "fix or delete the file") from None
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(type(token) is int and 0 <= token < vocab_size for token in ids):
        raise ConfigError(f"{path}: eos_token_id", f"{value!r} is not a token id or list of token ids of this "
                          f"tokenizer (0..{vocab_size - 1})", "fix or delete it")
    return tuple(ids)


def _token_content(value: str | dict | None) -> str | None:
    """tokenizer_config.json stores a special token as a string or as a serialized AddedToken."""
    return value.get("content") if isinstance(value, dict) else value


def train_bpe_tokenizer(files: list[str | Path], vocab_size: int, out_dir: str | Path,
                        special_tokens: tuple[str, ...] = ("<|pad|>", "<|bos|>", "<|eos|>")) -> Tokenizer:
    """Train a byte-level BPE tokenizer on text files and save it to `out_dir`.

    `special_tokens` are pad, bos, eos (in that order, ids 0, 1, 2), then any extras.
    Byte-level pre-tokenization with no normalizer makes decode(encode(x)) == x for any
    UTF-8 text without special-token strings; the trainer is deterministic for fixed inputs.
    """
    if len(special_tokens) < 3:
        raise ValueError(f"special_tokens must start with pad, bos, eos; got {special_tokens}")
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train([str(f) for f in files], trainer)
    pad, bos, eos = special_tokens[:3]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": pad,
        "bos_token": bos,
        "eos_token": eos,
        "additional_special_tokens": list(special_tokens[3:]),
        # transformers would otherwise rewrite spaces around punctuation on decode.
        "clean_up_tokenization_spaces": False,
    }
    tokenizer = Tokenizer(backend, config)
    tokenizer.save(out_dir)
    return tokenizer
