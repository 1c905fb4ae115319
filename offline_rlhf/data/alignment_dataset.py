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

from offline_rlhf.data.errors import DataError
from offline_rlhf.data.mixing import content_key, split_validation
from offline_rlhf.data.packing import PackedSequence, unpacked
from offline_rlhf.data.records import iter_json_objects, optional_turns, require_field, require_number
from offline_rlhf.data.skips import Skips, require_texts, strict_or
from offline_rlhf.data.template import ChatTemplate, Turn
from offline_rlhf.data.tokenize import TokenizedSample, TokenStats, encode_sft
from offline_rlhf.progress import Progress, quiet_progress

# The largest |reward| a labeled record may hold. `reward` is a z-score: over the n rewards
# it was normalized with, |z| < sqrt(n) (Samuelson's inequality), so 1e6 allows sets of up
# to 1e12 samples, and a raw reward-model score (reward_key=reward_raw) is far smaller. A
# larger value is a broken file or model, which would overflow the statistics (1e200 squared)
# and put a reward prompt no one can reach into DT training.
MAX_ABS_REWARD = 1e6


@dataclass(frozen=True)
class LabeledExample:
    prompt: str
    response: str
    reward: float
    source: str
    finished: bool = True  # False: the answer was cut at max_new_tokens, so it is trained without EOS
    turns: tuple[Turn, ...] = ()  # a multi-turn prompt's conversation (`prompt` is it folded); () for one turn


@dataclass(frozen=True)
class RewardedSequence:
    sequence: PackedSequence
    reward: float


@dataclass
class AlignmentDataset:
    train: list[RewardedSequence]
    val: list[RewardedSequence]
    card: dict


def read_labeled(path: str | PathLike, reward_key: str = "reward", skips: Skips | None = None) -> list[LabeledExample]:
    """Every usable record; a blank prompt or response is counted in `skips` (an error without).
    A reward beyond MAX_ABS_REWARD in absolute value is an error naming the line."""
    tag, skips, examples = f"labeled:{Path(path).name}", strict_or(skips), []
    for where, record in iter_json_objects(path):
        with skips.record():
            prompt, response = require_texts(record, ("prompt", "response"), where)
            finished = require_field(record, "finished", bool, where) if "finished" in record else True
            reward = require_number(record, reward_key, where)
            if abs(reward) > MAX_ABS_REWARD:
                raise where.error(f"expected {reward_key!r} to be a normalized reward (a z-score, at most "
                                  f"{MAX_ABS_REWARD:g} in absolute value; got {reward:g})")
            examples.append(LabeledExample(prompt, response, reward, f"{tag}:{where.record}", finished,
                                           optional_turns(record, where)))
    return examples


def encode_labeled(example: LabeledExample, tokenizer, template: ChatTemplate, max_len: int,
                   reward_prompt: bool) -> TokenizedSample:
    """With `reward_prompt`, the prompt ends `Assistant: <rm_score> a.b` (Eq. 6); the
    reward prompt is part of the prompt, so it carries no loss."""
    prefix = template.reward_prompt(example.reward) if reward_prompt else ""
    return encode_sft(tokenizer, template, example.prompt, example.response, max_len, example.source,
                      response_prefix=prefix, eos=example.finished, turns=example.turns)


def build_alignment_dataset(path: str | PathLike, tokenizer, template: ChatTemplate, max_len: int,
                            val_fraction: float, seed: int, reward_prompt: bool,
                            reward_key: str = "reward", keep_above: float | None = None,
                            strict: bool = False, progress: bool = True) -> AlignmentDataset:
    """With `keep_above` (Eq. 4's t), only samples with reward > t are tokenized and enter
    the splits: a filtered sample would cost a forward and backward for a zero loss, and
    the step count would be reckoned on samples never trained on. `strict`: an unusable
    record is an error (counted and skipped otherwise). Tokenizing shows progress on rank 0
    when it takes more than a few seconds, unless `progress` is False (logging.progress)."""
    skips = Skips(strict=strict)
    examples = read_labeled(path, reward_key, skips)
    # Split by content: copies of one answer never land on both sides.
    train_items, val_items = split_validation(examples, val_fraction, seed,
                                              key=lambda e: content_key(e.prompt, e.response))
    all_train, all_val = train_items, val_items
    if keep_above is not None:
        train_items, val_items = _kept(train_items, keep_above, path, reward_key), _kept(val_items, keep_above)
    stats = TokenStats()

    def encode_all(items: list[LabeledExample], bar: Progress) -> list[RewardedSequence]:
        samples = []
        for example in items:
            samples.append(encode_labeled(example, tokenizer, template, max_len, reward_prompt))
            stats.add(samples[-1])
            bar.update()
        return [RewardedSequence(seq, e.reward) for seq, e in zip(unpacked(samples), items)]

    with quiet_progress("align dataset", len(train_items) + len(val_items), "sample", progress) as bar:
        train, val = encode_all(train_items, bar), encode_all(val_items, bar)
    card = {"path": str(path), "examples": len(examples), "skipped": skips.counts, "train": len(train), "val": len(val),
            "reward_prompt": reward_prompt, "max_seq_len": max_len, "seed": seed, "tokens": asdict(stats),
            "train_rewards": reward_summary([e.reward for e in all_train])}
    if keep_above is not None:
        card["filter"] = {"threshold": keep_above, "train_filtered": len(all_train) - len(train),
                          "val_filtered": len(all_val) - len(val)}
    return AlignmentDataset(train, val, card)


def _kept(items: list[LabeledExample], threshold: float, path=None, reward_key: str = "") -> list[LabeledExample]:
    """Eq. 4's R > t; with `path`, an empty result is an error (there is nothing to train on)."""
    kept = [e for e in items if e.reward > threshold]
    if not kept and path is not None:
        highest = f"the highest of {len(items)} is {max(e.reward for e in items):.3f}" if items else "there are none"
        raise DataError(path, None, f"expected a training sample with {reward_key!r} > {threshold} "
                                    f"(filter_threshold; {highest})")
    return kept


def reward_summary(rewards: list[float]) -> dict[str, float]:
    n = len(rewards)
    mean = sum(rewards) / n
    std = (sum((r - mean) ** 2 for r in rewards) / n) ** 0.5
    return {"count": n, "mean": mean, "std": std, "min": min(rewards), "max": max(rewards),
            "fraction_positive": sum(r > 0 for r in rewards) / n}
