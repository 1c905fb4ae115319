"""Byte-level BPE tokenizer: exact round trips, special tokens, determinism, and the same
ids as transformers' AutoTokenizer loading the same directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from tests.fixtures import SHARED_DATA

SHAKESPEARE = SHARED_DATA / "tiny-corpora" / "char-rnn" / "tinyshakespeare" / "input.txt"
VOCAB_SIZE = 512
TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "  leading spaces, trailing tab\t and\r\nCRLF  ",
    "naïve café, Straße, 東京タワー, Ελληνικά, emoji 🎉👍🏽",
    "",
]


@pytest.fixture(scope="module")
def corpus() -> Path:
    # Fail, not skip: without the corpus these tests would check nothing.
    if not SHAKESPEARE.is_file():
        pytest.fail(f"Tiny Shakespeare not found: {SHAKESPEARE.resolve()}")
    return SHAKESPEARE


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[Tokenizer, Path]:
    out = tmp_path_factory.mktemp("tokenizer")
    return train_bpe_tokenizer([corpus], VOCAB_SIZE, out), out


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(trained, text):
    tokenizer, out = trained
    for candidate in (tokenizer, Tokenizer.from_dir(out)):
        assert candidate.decode(candidate.encode(text)) == text


def test_special_tokens_and_vocab(trained):
    tokenizer, _ = trained
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.vocab_size == VOCAB_SIZE
    ids = tokenizer.encode("hear me<|eos|>", add_bos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == "hear me"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|bos|>hear me<|eos|>"


def test_training_is_deterministic(trained, corpus, tmp_path):
    _, first = trained
    train_bpe_tokenizer([corpus], VOCAB_SIZE, tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()


def test_save_keeps_config(trained, tmp_path):
    tokenizer, _ = trained
    tokenizer.config["chat_template"] = "{{ messages }}"
    tokenizer.save(tmp_path)
    reloaded = Tokenizer.from_dir(tmp_path)
    assert reloaded.config == tokenizer.config and reloaded.encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])


def test_auto_tokenizer_agrees(trained):
    import transformers
    tokenizer, out = trained
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("name,text,reason", [
    ("tokenizer.json", '{"not": ', "is not a tokenizer the tokenizers library reads"),
    ("tokenizer_config.json", '{"bos_token": ', "is not valid JSON"),
    ("special_tokens_map.json", '["eos"]', "is not a JSON object"),
])
def test_a_damaged_file_is_one_line_naming_it(trained, tmp_path, name, text, reason):
    """Was a 23-32 line traceback from the Rust library or json, without the file's name."""
    from offline_rlhf.config.errors import ConfigError

    folder = tmp_path / "tok"
    trained[0].save(folder)
    (folder / name).write_text(text)
    with pytest.raises(ConfigError, match=f"^init.tokenizer: {folder / name} {reason}"):
        Tokenizer.from_dir(folder)
