"""Scoring (prompt, response) pairs with a reward model under any TP/DP layout: the one
home of reward scoring, used by `orlhf rm` (its loss and statistics), `label`, `rm-score`
and `eval`.

A reward is the value head's output at the last real token of `prompt + response + EOS`,
tokenized exactly as in reward-model training (`encode_sft`, same template and length
limit), so a score here equals the score training saw for the same text. An imported
transformers reward model whose pad token is its EOS is read where transformers reads it,
at the token before a trailing EOS (`scored_lengths`).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from offline_rlhf.checkpoint import TEMPLATE, TOKENIZER_DIR, CheckpointMeta, load_checkpoint, resolve_checkpoint
from offline_rlhf.checkpoint_meta import checkpoint_of_head
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig
from offline_rlhf.data.batching import PAD_DOCUMENT, collate_sequences
from offline_rlhf.data.chat_template import ChatFormat, build_template, template_record
from offline_rlhf.data.packing import PackedSequence, unpacked
from offline_rlhf.data.records import iter_json_objects, optional_turns, require_text
from offline_rlhf.data.template import ChatTemplate, Turn, split_system
from offline_rlhf.data.tokenize import Reply, TokenizedSample, encode_replies
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.models.llama import last_token_values
from offline_rlhf.parallel.parallelize import build_model
from offline_rlhf.progress import Progress, quiet_progress
from offline_rlhf.runtime import Runtime, autocast_for
from offline_rlhf.stage_checks import note_once
from offline_rlhf.stage_support import SCORED_BEFORE_TOKEN, checkpoint_tokenizer, note_untrusted

MAX_SEQ_LEN = "max_seq_len"  # checkpoint metadata written by `orlhf rm` (REWARD_STATS too: checkpoint_meta.py)


def sequence_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] rewards of right-padded one-document rows, each read at its last real token
    (`scored_lengths`)."""
    values = model(batch["tokens"], positions=batch["positions"])  # [B, T]
    return last_token_values(values, scored_lengths(batch, getattr(model, SCORED_BEFORE_TOKEN, None)))


def scored_lengths(batch: dict[str, torch.Tensor], skipped: int | None = None) -> torch.Tensor:
    """[B] each row's length up to the token its reward is read at: its last real token,
    or with `skipped` (an imported model's pad token that is its EOS) the last real one that
    is not `skipped`, as transformers' `*ForSequenceClassification` reads it."""
    real = batch["document_ids"] != PAD_DOCUMENT
    if skipped is None:
        return real.sum(1)
    kept = real & (batch["tokens"] != skipped)
    return (torch.arange(kept.shape[1], device=kept.device) * kept).argmax(1) + 1


def encode_responses(tokenizer, template: ChatTemplate, pairs: Sequence[tuple[str, str]],
                     max_len: int, finished: Sequence[bool] | None = None,
                     turns: Sequence[Sequence[Turn]] | None = None) -> list[PackedSequence]:
    """`prompt + response + EOS` per pair, cut by `encode_sft`'s truncation rule."""
    return unpacked(encode_scored(tokenizer, template, pairs, max_len, finished, turns))


def encode_scored(tokenizer, template: ChatTemplate, pairs: Sequence[tuple[str, str]], max_len: int,
                  finished: Sequence[bool] | None = None,
                  turns: Sequence[Sequence[Turn]] | None = None, progress: bool = True) -> list[TokenizedSample]:
    """`encode_responses` before unpacking, so a caller can count `.truncated`. A pair with
    `finished[i]` False (a generation cut at max_new_tokens) gets no EOS: its reward is
    read at its last real token, not at an end the answer never reached. `turns[i]`, a
    multi-turn prompt's conversation, is what a chat template renders (as in training).
    Tokenizing shows progress on rank 0 when it takes more than a few seconds, unless
    `progress` is False.

    The answers to one single-turn prompt (generate's n samples) are encoded together, the
    prompt once (`encode_replies`: for a prompt without turns each sample is `encode_sft`'s
    of its own pair); a multi-turn prompt's answers are encoded one by one, as the history
    each keeps depends on its own length."""
    ends = [True] * len(pairs) if finished is None else finished
    histories = [()] * len(pairs) if turns is None else turns
    samples: list[TokenizedSample | None] = [None] * len(pairs)
    with quiet_progress("tokenizing for scoring", len(pairs), "sample", progress) as bar:
        for prompt, history, indices in _answers_together(pairs, histories):
            replies = [Reply(pairs[i][1], ends[i], f"pair {i}") for i in indices]
            for index, sample in zip(indices, encode_replies(tokenizer, template, prompt, replies, max_len,
                                                             turns=history)):
                samples[index] = sample
            bar.update(len(indices))
    return samples


def _answers_together(pairs: Sequence[tuple[str, str]],
                      histories: Sequence[Sequence[Turn]]) -> list[tuple[str, Sequence[Turn], list[int]]]:
    """(prompt, turns, indices of its pairs): a single-turn prompt's pairs (a system turn
    before it or not) in one group, in the order of their first pair; each pair of a
    multi-turn prompt a group of its own (fitting may drop other exchanges for each answer)."""
    groups: dict[object, tuple[str, Sequence[Turn], list[int]]] = {}
    for index, ((prompt, _), history) in enumerate(zip(pairs, histories, strict=True)):
        key = (prompt, tuple(history)) if len(split_system(history)[1]) <= 1 else index
        groups.setdefault(key, (prompt, history, []))[2].append(index)
    return list(groups.values())


@torch.no_grad()
def score_sequences(model: nn.Module, sequences: Sequence[PackedSequence], batch_size: int, rt: Runtime,
                    pad_id: int, progress: Progress | None = None) -> list[float]:
    """One reward per sequence, in input order, on every rank.

    Sequences are sorted by length (less padding), then dealt round-robin to the DP
    ranks, each scoring its disjoint share in batches of `batch_size`. Every rank runs
    the same number of forwards (FSDP gathers weights collectively), repeating its
    first batch where it has run out. TP ranks compute identical rewards. `progress`
    (total: len(sequences)) advances by what all ranks scored in each lockstep batch.
    """
    if not sequences:
        return []
    dp, rank = rt.dims.dp, rt.dp_rank
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    mine = order[rank::dp]
    share = math.ceil(len(order) / dp)
    local = torch.full((share,), math.nan, dtype=torch.float64, device=rt.device)
    for start in range(0, share, batch_size):
        chunk = mine[start:start + batch_size]
        batch = collate_sequences([sequences[i] for i in chunk or mine[:1] or order[:1]], pad_id,
                                  rt.dims.sequence_multiple)
        with autocast_for(rt.device):
            rewards = sequence_rewards(model, {k: v.to(rt.device) for k, v in batch.items()})
        local[start:start + len(chunk)] = rewards[:len(chunk)].double()
        if progress is not None:  # ranks run in lockstep: order[:k * dp] is scored when each has scored k
            progress.update(min(len(order), (start + batch_size) * dp) - min(len(order), start * dp))
    return _require_finite(_gather_in_order(local, order, rt))


def _require_finite(scores: list[float]) -> list[float]:
    """A NaN or infinite reward would pass into z-scores, weights and tables unnoticed."""
    bad = [index for index, score in enumerate(scores) if not math.isfinite(score)]
    if bad:
        raise ConfigError("reward model", f"gave a non-finite reward for {len(bad)} of {len(scores)} sequences "
                          f"(first: #{bad[0]})", "its weights are likely non-finite: use an earlier checkpoint "
                          "or retrain it with a lower optim.lr")
    return scores


def _gather_in_order(local: torch.Tensor, order: list[int], rt: Runtime) -> list[float]:
    """Rank r's k-th score belongs to item order[r + k * dp]."""
    dp = rt.dims.dp
    shares = [local]
    if dp > 1:
        shares = [torch.empty_like(local) for _ in range(dp)]
        dist.all_gather(shares, local, group=rt.mesh.get_group("dp"))
    scores = [math.nan] * len(order)
    for rank, share in enumerate(shares):
        for k, value in enumerate(share.tolist()[: len(order[rank::dp])]):
            scores[order[rank + k * dp]] = value
    return scores


def score_texts(model: nn.Module, tokenizer, template: ChatTemplate, pairs: Sequence[tuple[str, str]],
                batch_size: int, rt: Runtime, max_len: int | None = None,
                finished: Sequence[bool] | None = None, turns: Sequence[Sequence[Turn]] | None = None,
                progress: Progress | None = None) -> list[float]:
    """Raw rewards of (prompt, response) pairs, in input order, on every rank. `max_len`
    (default: the model's max_seq_len) should be the length the model was trained with;
    `finished[i]` False scores a cut-off answer without EOS, `turns[i]` renders a multi-turn
    prompt (see `encode_scored`); `progress` as `score_sequences`'."""
    max_len = max_len or model.cfg.max_seq_len
    return score_sequences(model, encode_responses(tokenizer, template, pairs, max_len, finished, turns), batch_size,
                           rt, tokenizer.pad_id, progress)


def reward_stats(scores: Sequence[float], source: str) -> dict:
    """Mean and population standard deviation, the statistics a later z-score uses."""
    return {"mean": statistics.fmean(scores), "std": statistics.pstdev(scores), "count": len(scores), "source": source}


def scoring_metadata(template: ChatTemplate | ChatFormat, max_len: int) -> dict:
    """What a reward checkpoint records so that scoring tokenizes as training did."""
    return {TEMPLATE: template_record(template), MAX_SEQ_LEN: max_len}


def scoring_setup(metadata: dict, model: ModelConfig, tokenizer: Tokenizer) -> tuple[ChatTemplate | ChatFormat, int]:
    """The checkpoint's template and length limit; defaults for imported reward models."""
    return build_template(metadata.get(TEMPLATE, {}), tokenizer.config), metadata.get(MAX_SEQ_LEN, model.max_seq_len)


def load_reward_model(ckpt: str, rt: Runtime, key: str = "ckpt") -> tuple[nn.Module, Tokenizer, dict]:
    """A value-head checkpoint in the runtime's layout, its tokenizer and metadata."""
    path, meta, tokenizer = reward_checkpoint(ckpt, key)
    return reward_weights(path, meta, rt), tokenizer, meta.metadata


def reward_checkpoint(ckpt: str, key: str = "ckpt") -> tuple[Path, CheckpointMeta, Tokenizer]:
    """A value-head checkpoint's path, metadata and tokenizer, without its weights: what a
    stage needs to read its inputs as the model will score them, before the slow load. A
    tokenizer without a pad token pads with EOS, as the training stages do (`load_tokenizer`)."""
    path = resolve_checkpoint(ckpt, key)
    meta = checkpoint_of_head(path, "value", key)
    if not (path / TOKENIZER_DIR).is_dir():
        raise ConfigError(key, f"{path} has no {TOKENIZER_DIR}/ folder", "score with a checkpoint that has one")
    tokenizer = checkpoint_tokenizer(path)
    if SCORED_BEFORE_TOKEN in meta.metadata:
        note_once(f"{key}: {path} is an imported reward model whose pad token is its EOS: its scores are read at the "
                  "last token before a trailing EOS, as transformers reads them")
    return path, meta, tokenizer


def reward_weights(path: Path, meta: CheckpointMeta, rt: Runtime) -> nn.Module:
    """The reward model of `reward_checkpoint` in the runtime's layout (FSDP over DP, like
    training: score_sequences runs the same forwards on every rank), carrying where its
    scores are read (its `SCORED_BEFORE_TOKEN`, an attribute) to `sequence_rewards`."""
    model = build_model(meta.model, "value", rt.dims, rt.mesh, rt.device)
    note_untrusted(path, rt)
    load_checkpoint(path, model, group=rt.group)
    setattr(model, SCORED_BEFORE_TOKEN, meta.metadata.get(SCORED_BEFORE_TOKEN))
    return model


def read_scoring_input(path: str, prompt_key: str,
                       response_key: str) -> tuple[list[dict], list[tuple[str, str]], list[tuple[Turn, ...]]]:
    """Records, their (prompt, response) and the turns of multi-turn prompts (`turns`); a
    missing or non-text field is an error naming the line."""
    records, pairs, turns = [], [], []
    for where, record in iter_json_objects(path):
        records.append(record)
        pairs.append((require_text(record, prompt_key, where),
                      require_text(record, response_key, where, allow_empty=True)))
        turns.append(optional_turns(record, where))
    return records, pairs, turns
