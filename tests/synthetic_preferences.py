"""Preference pairs from a KNOWN rule, for tests that a reward model learns something:
replies are random filler words, and the chosen reply holds more of the marker word."""

from __future__ import annotations

import json
import random
from pathlib import Path

from offline_rlhf.config.schema import ModelConfig
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer

FILLER = "apple river stone cloud music paper green window table light".split()
MARKER = "good"
# 259 = 256 byte symbols + pad/bos/eos; the rest are merges, enough for whole words.
VOCAB = 320
MODEL = ModelConfig(name="rm-test", vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                    max_seq_len=64)


def _reply(rng: random.Random, markers: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(5, 8))]
    for _ in range(markers):
        words.insert(rng.randrange(len(words) + 1), MARKER)
    return " ".join(words)


def preference_records(count: int, seed: int = 0) -> list[dict]:
    """chosen has 2-3 markers, rejected 0-1: the rule `reward = marker count` ranks every pair."""
    rng = random.Random(seed)
    return [{"prompt": f"Say something about {rng.choice(FILLER)}.", "chosen": _reply(rng, rng.randint(2, 3)),
             "rejected": _reply(rng, rng.randint(0, 1))} for _ in range(count)]


def write_preferences(path: Path, count: int, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in preference_records(count, seed)))
    return path


def synthetic_tokenizer(out_dir: Path) -> Tokenizer:
    corpus = out_dir.parent / f"{out_dir.name}_corpus.txt"
    text = "\n".join(" ".join(r.values()) for r in preference_records(200, seed=99))
    corpus.write_text(text + "\nUser: Assistant:\n")
    return train_bpe_tokenizer([corpus], VOCAB, out_dir)


def synthetic_chat_tokenizer(out_dir: Path) -> Tokenizer:
    """`synthetic_tokenizer` with a minimal Jinja chat template (template.kind=chat)."""
    tokenizer = synthetic_tokenizer(out_dir)
    tokenizer.config["chat_template"] = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tokenizer.save(out_dir)
    return tokenizer
