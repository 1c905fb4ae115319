"""The reward-labeled alignment dataset for offline alignment (no torch here).

Reads the JSONL written by `orlhf mix` (or any file of `{prompt, response, reward}`
records, `reward` being the normalized reward), splits off validation examples,
tokenizes each example as one sequence (every row keeps its own reward) and, for
Decision-Transformer alignment, puts the reward prompt after the assistant tag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path

from offline_rlhf.data.mixing import split_validation
from offline_rlhf.data.packing import PackedSequence, unpacked
from offline_rlhf.data.records import iter_json_objects, require_number, require_text
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import TokenizedSample, TokenStats, encode_sft


@dataclass(frozen=True)
class LabeledExample:
    prompt: str
    response: str
    reward: float
    source: str


@dataclass(frozen=True)
class RewardedSequence:
    sequence: PackedSequence
    reward: float


@dataclass
class AlignmentDataset:
    train: list[RewardedSequence]
    val: list[RewardedSequence]
    card: dict


def read_labeled(path: str | PathLike, reward_key: str = "reward") -> list[LabeledExample]:
    tag = f"labeled:{Path(path).name}"
    return [LabeledExample(require_text(record, "prompt", where), require_text(record, "response", where),
                           require_number(record, reward_key, where), f"{tag}:{where.record}")
            for where, record in iter_json_objects(path)]


def encode_labeled(example: LabeledExample, tokenizer, template: ChatTemplate, max_len: int,
                   reward_prompt: bool) -> TokenizedSample:
    """With `reward_prompt`, the prompt ends `Assistant: <rm_score> a.b` (Eq. 6); the
    reward prompt is part of the prompt, so it carries no loss."""
    prefix = template.reward_prompt(example.reward) if reward_prompt else ""
    return encode_sft(tokenizer, template, example.prompt, example.response, max_len, example.source,
                      response_prefix=prefix)


def build_alignment_dataset(path: str | PathLike, tokenizer, template: ChatTemplate, max_len: int,
                            val_fraction: float, seed: int, reward_prompt: bool,
                            reward_key: str = "reward") -> AlignmentDataset:
    examples = read_labeled(path, reward_key)
    train_items, val_items = split_validation(examples, val_fraction, seed)
    stats = TokenStats()

    def encode_all(items: list[LabeledExample]) -> list[RewardedSequence]:
        samples = [encode_labeled(e, tokenizer, template, max_len, reward_prompt) for e in items]
        for sample in samples:
            stats.add(sample)
        return [RewardedSequence(seq, e.reward) for seq, e in zip(unpacked(samples), items)]

    train, val = encode_all(train_items), encode_all(val_items)
    card = {"path": str(path), "examples": len(examples), "train": len(train), "val": len(val),
            "reward_prompt": reward_prompt, "max_seq_len": max_len, "seed": seed, "tokens": asdict(stats),
            "train_rewards": reward_summary([e.reward for e in train_items])}
    return AlignmentDataset(train, val, card)


def reward_summary(rewards: list[float]) -> dict[str, float]:
    n = len(rewards)
    mean = sum(rewards) / n
    std = (sum((r - mean) ** 2 for r in rewards) / n) ** 0.5
    return {"count": n, "mean": mean, "std": std, "min": min(rewards), "max": max(rewards),
            "fraction_positive": sum(r > 0 for r in rewards) / n}
