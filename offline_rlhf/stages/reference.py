"""`orlhf reference`: the preference pairs of DPO, IPO and cDPO with their reference
log-probs, computed offline and once, into `run_dir/reference/pairs.jsonl`.

The pairs are built from `orlhf label` output (`labeling.pairs`: RM-ranked best vs worst
generated answers and human pairs, mixed by weight; counts in `dataset_card.{json,md}`);
this stage rather than `orlhf mix` makes them, so the pair set and its log-probs cannot
drift apart. The SFT model then scores both replies of every pair: TP-only replicas (like
`orlhf generate`) each take a disjoint block of the pairs not scored yet and append
`{id, ref_chosen_logp, ref_rejected_logp, tokens_sha1}` to their own durable shard; a rerun
after a crash cuts a torn line, skips scored ids and never scores one twice, and stops if a
scored pair tokenizes otherwise now (its input changed under the same path). Rank 0 merges
the shards. Pairs are rendered with the template the SFT checkpoint records, as align
renders them. Its ledger row is DPO's data preparation: align then needs no second model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

from offline_rlhf.checkpoint import resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.samples import ReferenceConfig
from offline_rlhf.config.schema import ModelConfig
from offline_rlhf.data.chat_template import template_record
from offline_rlhf.data.packing import unpacked
from offline_rlhf.data.pair_dataset import DIGEST, REF_CHOSEN, REF_REJECTED, encode_pair_example, tokens_digest
from offline_rlhf.fsutil import append_jsonl_durably, write_atomic, write_jsonl
from offline_rlhf.generation.shards import (
    RESTART,
    merge_shards,
    my_share,
    new_records,
    resume_shards,
    show_shards,
    wait_for_replicas,
)
from offline_rlhf.labeling.mix import read_labeled_records
from offline_rlhf.labeling.pairs import build_pairs, sequence_logps
from offline_rlhf.progress import quiet_progress
from offline_rlhf.runtime import SAME_INPUTS, Runtime, same_on_every_rank, stage_runtime
from offline_rlhf.stage_checks import load_tokenizer
from offline_rlhf.stage_support import (
    init_template,
    load_inference_model,
    local_init,
    mark_done,
    model_config,
    model_fingerprint,
)

STAGE = "reference"
PAIRS = "pairs.jsonl"


def main(cfg: ReferenceConfig) -> int:
    init = local_init(cfg.init, cfg.run_dir)  # a Hugging Face model is imported once, into the run
    checkpoint = resolve_checkpoint(init.checkpoint, "init.checkpoint")
    model_cfg = model_config(init, ModelConfig())
    if cfg.max_seq_len > model_cfg.max_seq_len:
        raise ConfigError("max_seq_len", f"{cfg.max_seq_len} exceeds max_seq_len={model_cfg.max_seq_len} of "
                          "init.checkpoint's model", f"set max_seq_len<={model_cfg.max_seq_len}")
    tokenizer, _ = load_tokenizer(init, model_cfg)
    template = init_template(init, cfg.template, "template", tokenizer.config)  # as the model was trained
    with stage_runtime(STAGE, cfg.run_dir, cfg.parallel, model_cfg, cfg) as (rt, usage):
        pairs, card = build_pairs(read_labeled_records(cfg.input), cfg.min_gap, asdict(cfg.weights), cfg.total,
                                  cfg.seed, cfg.input)
        pairs, encoded = distinct_pairs(pairs, tokenizer, template, cfg, card)
        digests = [tokens_digest(*pair) for pair in encoded]
        same_on_every_rank(rt, {"pairs": len(pairs), "sha256": hashlib.sha256("".join(digests).encode()).hexdigest()},
                           "input", "pairs", SAME_INPUTS)  # each replica scores its block of them, by position
        done = scored_pairs(rt, cfg, checkpoint, digests)
        tokens = [len(chosen) + len(rejected) for chosen, rejected in encoded]  # what scoring a pair reads
        counted = new_records(rt, lambda record: tokens[record["id"]]) if rt.is_main else None
        usage.resumed = bool(done)  # continues the scores of earlier executions (charged with this one)
        todo = [i for i in range(len(pairs)) if i not in done]
        mine, shard = my_share(rt, todo)
        rt.log(f"reference: {len(pairs)} pairs ({summary(card)}), {len(pairs) - len(todo)} already scored, "
               f"{len(todo)} to go on {rt.dims.dp} replica(s) of TP={rt.dims.tp}")
        model = load_inference_model(checkpoint, "lm", rt, "init.checkpoint")
        # Rank 0's bar counts every replica's pairs (the shards'), from those scored before this execution.
        with quiet_progress(STAGE, len(pairs), "pair", initial=len(pairs) - len(todo)) as bar:
            show = partial(show_shards, counted, usage, bar) if rt.is_main else None
            score_share(model, mine, encoded, shard, cfg, rt, tokenizer.pad_id, show)
            wait_for_replicas(rt, show)
        if rt.is_main:
            write_outputs(rt, cfg, pairs, encoded, card, checkpoint, template_record(template))
    return 0


def distinct_pairs(pairs: list, tokenizer, template, cfg: ReferenceConfig, card: dict) -> tuple[list, list]:
    """The pairs and their encodings, without those whose two sides are identical once cut
    to max_seq_len (no signal, as the RM stage decides: a margin of 0 counts as a wrong
    ranking), counted in the card; with `strict` they are an error."""
    encoded = [encode_pair_example(tokenizer, template, p.example, cfg.max_seq_len) for p in pairs]
    kept = [i for i, (chosen, rejected) in enumerate(encoded) if chosen.input_ids != rejected.input_ids]
    card["identical_after_truncation"] = identical = len(pairs) - len(kept)
    card["pairs"] = len(kept)  # what pairs.jsonl holds
    if identical and (cfg.strict or not kept):
        first = next(p.example.prompt for p, (c, r) in zip(pairs, encoded) if c.input_ids == r.input_ids)
        raise ConfigError("max_seq_len", f"{identical} of {len(pairs)} pairs have identical sides once cut to "
                          f"{cfg.max_seq_len} tokens (first: prompt {first[:60]!r})",
                          "raise max_seq_len" + ("" if not kept else ", or strict=false to skip and count them"))
    return [pairs[i] for i in kept], [encoded[i] for i in kept]


def scored_pairs(rt: Runtime, cfg: ReferenceConfig, checkpoint: Path, digests: list[str]) -> set[int]:
    """The pairs an earlier run of this config scored (`resume_shards`), each `fresh`."""
    return resume_shards(rt, model_fingerprint(cfg, checkpoint), 1,
                         check=partial(fresh, digests=digests, cfg=cfg, stage_dir=rt.stage_dir))


def fresh(records: Iterable[dict], digests: list[str], cfg: ReferenceConfig, stage_dir: Path) -> Iterator[dict]:
    """The shard `records`, passed on; at their end, refused if any is stale. Each carries
    the digest of the tokens it scored: one that is not the pair's digest now (the input
    file, the tokenizer or the checkpoint's template changed under the same config) holds
    log-probs of other sequences, and the run stops rather than merge them."""
    stale, first = 0, None
    for record in records:
        if not 0 <= record["id"] < len(digests) or record.get(DIGEST) != digests[record["id"]]:
            stale, first = stale + 1, record["id"] if first is None else first
        yield record
    if stale:
        raise ConfigError("input", f"{stale} of the pairs scored in {stage_dir} tokenize otherwise now "
                          f"(first: id {first}): {cfg.input}, the tokenizer or init.checkpoint's template "
                          "changed since", f"restore what they were scored from, or "
                          f"{RESTART.format(stage_dir=stage_dir)}")


def write_outputs(rt: Runtime, cfg: ReferenceConfig, pairs: list, encoded: list, card: dict, model: Path,
                  template: dict) -> None:
    """Rank 0, after every replica: the merged pairs with their log-probs and the digest of
    the tokens scored, the card (naming the scoring checkpoint, also relative to the run
    when inside it: align finds it there after the run folder moved), DONE."""
    scores = merge_shards(rt.stage_dir, len(pairs))
    write_jsonl(rt.stage_dir / PAIRS, [{"id": i, **pair.record(), REF_CHOSEN: s[REF_CHOSEN],
                                        REF_REJECTED: s[REF_REJECTED], DIGEST: s[DIGEST]}
                                       for i, (pair, s) in enumerate(zip(pairs, scores))])
    run = rt.stage_dir.parent.resolve()
    in_run = str(model.resolve().relative_to(run)) if model.resolve().is_relative_to(run) else None
    card.update(model=str(model), model_in_run=in_run, template=template, max_seq_len=cfg.max_seq_len,
                truncated=sum(s.truncated for pair in encoded for s in pair))
    write_atomic(rt.stage_dir / "dataset_card.json", json.dumps(card, indent=2))
    write_atomic(rt.stage_dir / "dataset_card.md", card_markdown(card))
    mark_done(rt, rt.stage_dir / PAIRS)
    rt.log(f"reference done: {len(pairs)} pairs with reference log-probs in {rt.stage_dir / PAIRS}; "
           f"{card['truncated']} replies truncated to {cfg.max_seq_len} tokens")


def score_share(model, mine: list[int], encoded: list, shard: Path | None, cfg: ReferenceConfig, rt: Runtime,
                pad_id: int, show: Callable[[], None] | None) -> None:
    """This replica's pairs `mine`, `write_every` at a time, each block appended durably to
    its shard (a crash loses the block in flight); `show`: rank 0's progress after each."""
    for start in range(0, len(mine), cfg.write_every):
        ids = mine[start:start + cfg.write_every]
        records = score_block(model, [encoded[i] for i in ids], ids, cfg.batch_size, rt, pad_id)
        if shard is not None:
            append_jsonl_durably(shard, records)
        if show is not None:
            show()


def score_block(model, encoded: list, ids: list[int], batch_size: int, rt: Runtime, pad_id: int) -> list[dict]:
    """Shard records for the pairs `ids`: both replies' log-probs and the digest of their tokens."""
    sequences = unpacked([sample for pair in encoded for sample in pair])  # c0, r0, c1, r1, ...
    logps = sequence_logps(model, sequences, batch_size, rt, pad_id)
    return [{"id": i, REF_CHOSEN: logps[2 * k], REF_REJECTED: logps[2 * k + 1], DIGEST: tokens_digest(*pair)}
            for k, (i, pair) in enumerate(zip(ids, encoded))]


def summary(card: dict) -> str:
    ranked, human = card["rm_ranked"], card["human"]
    return (f"{ranked['pairs']} RM-ranked from {ranked['prompts']} prompts: {ranked['single_sample']} with one "
            f"sample, {ranked['tie']} ties, {ranked['below_gap']} below min_gap {card['min_gap']}; "
            f"{human['pairs']} human, {human['incomplete']} incomplete; "
            f"{card['identical_after_truncation']} skipped, identical once cut to max_seq_len")


def card_markdown(card: dict) -> str:
    lines = ["# Preference-pair dataset card", "", f"{card['pairs']} pairs from `{card['input']}`, reference "
             f"log-probs by `{card['model']}` (max_seq_len {card['max_seq_len']}, {card['truncated']} replies "
             "truncated)", "", summary(card), "", "| source | available pairs | taken | repeated |",
             "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s['available']} | {s['taken']} | {s['repeated']} |" for name, s in card["groups"].items()]
    return "\n".join(lines) + "\n"
