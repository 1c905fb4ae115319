"""Gold-reward plug-ins for the tests: `gold=tests.unit.eval.gold_plugins:NAME`, and a tiny
Hugging Face reward model for `gold=hf_rm:PATH`."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tests.synthetic_preferences import VOCAB, synthetic_tokenizer

GOOD = "good"


def marker_share(prompt: str, response: str) -> float:
    """Share of the response's words that are the marker word, minus a tenth per prompt word."""
    words = response.split()
    return sum(w == GOOD for w in words) / max(len(words), 1) - 0.1 * len(prompt.split())


def not_a_number(prompt: str, response: str) -> float:
    return math.nan


def a_string(prompt: str, response: str) -> str:
    return "3.0"


class Scorers:
    @staticmethod
    def length(prompt: str, response: str) -> int:
        return len(response)


NOT_CALLABLE = 3.0


def tiny_hf_reward_model(out: Path) -> Path:
    """A random LlamaForSequenceClassification saved with the synthetic tokenizer into `out`."""
    import transformers

    tokenizer = synthetic_tokenizer(out)  # tokenizer.json + tokenizer_config.json, loadable by AutoTokenizer
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      num_labels=1, pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
                                      eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores far enough apart to tell answers apart
    model.save_pretrained(out)
    return out
