"""Preference pairs with their reference log-probs, for DPO, IPO and cDPO (no torch here).

`orlhf reference` writes `run_dir/reference/pairs.jsonl`: one record per pair,
{id, prompt, chosen, rejected, origin, source, ..., ref_chosen_logp, ref_rejected_logp,
tokens_sha1}. Both it and `orlhf align` tokenize a pair with `encode_pair_example`, and
the digest of the token ids it stored lets align refuse a pair tokenized differently
(another template, length limit or tokenizer): its reference log-probs would belong to
other sequences.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from os import PathLike

from offline_rlhf.data.errors import DataError
from offline_rlhf.data.mixing import content_key, split_validation
from offline_rlhf.data.packing import PackedSequence, unpacked
from offline_rlhf.data.records import (
    TURNS,
    iter_json_objects,
    optional_turns,
    require_field,
    require_number,
    require_text,
    turns_field,
)
from offline_rlhf.data.template import ChatTemplate, Turn
from offline_rlhf.data.tokenize import Reply, TokenizedSample, TokenStats, encode_replies

REF_CHOSEN, REF_REJECTED, DIGEST = "ref_chosen_logp", "ref_rejected_logp", "tokens_sha1"


@dataclass(frozen=True)
class PairExample:
    prompt: str
    chosen: str
    rejected: str
    chosen_finished: bool = True  # False: a generation cut at max_new_tokens, encoded without EOS
    rejected_finished: bool = True
    turns: tuple[Turn, ...] = ()  # a multi-turn prompt's conversation (`prompt` is it folded); () for one turn


@dataclass(frozen=True)
class ReferencedPair:
    """Both replies as one-document sequences and their summed reference log-probs."""

    chosen: PackedSequence
    rejected: PackedSequence
    ref_chosen: float
    ref_rejected: float


@dataclass
class PairDataset:
    train: list[ReferencedPair]
    val: list[ReferencedPair]
    card: dict


def encode_pair_example(tokenizer, template: ChatTemplate, example: PairExample,
                        max_len: int) -> tuple[TokenizedSample, TokenizedSample]:
    """`prompt + reply (+ EOS when finished)` for both replies, cut by `encode_sft`'s rule
    with one history for both sides (`encode_replies`)."""
    chosen, rejected = encode_replies(tokenizer, template, example.prompt,
                                      [Reply(example.chosen, example.chosen_finished, "chosen"),
                                       Reply(example.rejected, example.rejected_finished, "rejected")],
                                      max_len, turns=example.turns)
    return chosen, rejected


def tokens_digest(chosen: TokenizedSample, rejected: TokenizedSample) -> str:
    """SHA-1 of both sequences' ids and labels: equal exactly when both are tokenized alike.
    The text hashed is the repr of their tuples, as when samples held tuples: reference
    shards record it, and align compares."""
    text = repr(tuple(map(tuple, (chosen.input_ids, chosen.labels, rejected.input_ids, rejected.labels))))
    return hashlib.sha1(text.encode()).hexdigest()


def read_pair_example(record: dict, where) -> PairExample:
    prompt, chosen, rejected = (require_text(record, key, where, allow_empty=key != "prompt")
                                for key in ("prompt", "chosen", "rejected"))
    flags = [require_field(record, key, bool, where) if key in record else True
             for key in ("chosen_finished", "rejected_finished")]
    return PairExample(prompt, chosen, rejected, *flags, optional_turns(record, where))


def pair_record(example: PairExample) -> dict:
    """What a pair file holds of an example (finished flags only when False, turns only
    for a multi-turn prompt)."""
    return {**{key: value for key, value in asdict(example).items() if value is not True and key != TURNS},
            **turns_field(example.turns)}


def read_referenced_pairs(path: str | PathLike, tokenizer, template: ChatTemplate,
                          max_len: int) -> tuple[list[ReferencedPair], TokenStats, list[tuple[str, str, str]]]:
    """Every pair of `orlhf reference`'s file, encoded, with its reference log-probs;
    also token counts and each pair's (prompt, chosen, rejected) for the split. A pair
    whose tokens differ from those the reference pass scored is an error naming its line."""
    pairs, stats, texts = [], TokenStats(), []
    for where, record in iter_json_objects(path):
        example = read_pair_example(record, where)
        ref = [require_number(record, key, where) for key in (REF_CHOSEN, REF_REJECTED)]
        chosen, rejected = encode_pair_example(tokenizer, template, example, max_len)
        if require_text(record, DIGEST, where) != tokens_digest(chosen, rejected):
            raise where.error("expected the pair to tokenize as in the reference pass; data.max_seq_len, "
                              "data.template and the tokenizer must equal `orlhf reference`'s (rerun it)")
        stats.add(chosen)
        stats.add(rejected)
        pairs.append(ReferencedPair(*unpacked([chosen, rejected]), *ref))
        texts.append((example.prompt, example.chosen, example.rejected))
    if not pairs:
        raise DataError(path, None, "expected at least one pair (is `orlhf reference` output empty?)")
    return pairs, stats, texts


def build_pair_dataset(path: str | PathLike, tokenizer, template: ChatTemplate, max_len: int,
                       val_fraction: float, seed: int) -> PairDataset:
    """Train/validation pairs, split by content (copies of a pair stay on one side)."""
    pairs, stats, texts = read_referenced_pairs(path, tokenizer, template, max_len)
    indices = list(range(len(pairs)))
    train, val = split_validation(indices, val_fraction, seed, key=lambda i: content_key(*texts[i]))
    card = {"path": str(path), "pairs": len(pairs), "train": len(train), "val": len(val), "max_seq_len": max_len,
            "seed": seed, "tokens": asdict(stats)}
    return PairDataset([pairs[i] for i in train], [pairs[i] for i in val], card)
