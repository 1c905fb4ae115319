"""`orlhf label`: reward-label samples and z-score normalize the rewards (paper step 3).

Every sample (generated responses, human SFT responses, both sides of preference pairs)
gets `reward_raw` from the reward model and `reward = (reward_raw - mean) / std`, with the
mean and standard deviation of the labeled set itself (`normalization=labeled_set`) or the
ones `orlhf rm` stored from its validation responses (`normalization=rm_stats`). The choice
and the numbers go into `labels_meta.json`; `reward_histogram.png` shows both distributions.
The raw rewards are saved as they are scored (`write_every` samples at a time): a rerun of
a stopped or killed labeling goes on from them.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from offline_rlhf.config.errors import ResumeRefused
from offline_rlhf.config.samples import LabelConfig
from offline_rlhf.data.errors import DataError
from offline_rlhf.data.hub_datasets import hub_options, source_key
from offline_rlhf.data.packing import unpacked
from offline_rlhf.data.skips import Skips, describe
from offline_rlhf.fsutil import append_jsonl_durably, write_atomic, write_jsonl
from offline_rlhf.labeling.normalize import counts_by_source, labeled_records, normalization_stats, normalize
from offline_rlhf.labeling.plots import reward_histogram
from offline_rlhf.labeling.samples import Sample, identical_once_cut, read_samples, selected_per_prompt
from offline_rlhf.labeling.scoring import (
    encode_scored,
    reward_checkpoint,
    reward_weights,
    score_sequences,
    scoring_setup,
)
from offline_rlhf.ledger import Usage
from offline_rlhf.progress import Progress
from offline_rlhf.runtime import Runtime, stage_runtime
from offline_rlhf.stage_support import check_resumable, items_digest, mark_done, step_identity

STAGE = "label"
LABELED = "labeled.jsonl"
META = "labels_meta.json"
SCORES = "scores.partial.jsonl"  # the raw rewards so far, a line per block of samples: what a rerun goes on from
SCORED_UNDER = "scores.fingerprint.json"  # the reward model and the samples' token ids they were scored from


def main(cfg: LabelConfig) -> int:
    rm_path, rm_meta, tokenizer = reward_checkpoint(cfg.rm, key="rm")
    metadata = rm_meta.metadata
    with stage_runtime(STAGE, cfg.run_dir, cfg.parallel, rm_meta.model, cfg) as (rt, usage):
        template, max_len = scoring_setup(metadata, rm_meta.model, tokenizer)
        samples, skipped = read_inputs(cfg, template)  # before the model: a bad input fails in seconds
        encoded = encode_scored(tokenizer, template, [(s.prompt, s.response) for s in samples], max_len,
                                [s.finished is not False for s in samples], [s.turns for s in samples])
        sequences = unpacked(encoded)
        # What a raw reward depends on: the reward model and the token ids it reads (normalization
        # and selection come after; the ids hold the inputs, the template and the length limit).
        raw = earlier_scores(rt, {"reward model": step_identity(rm_path), "samples": items_digest(sequences)})
        usage.resumed = bool(raw)  # continues the scores of earlier executions (charged with this one)
        model = reward_weights(rm_path, rm_meta, rt)
        rt.log(f"label: scoring {len(samples)} samples with {rm_path}"
               + (f" ({len(raw)} scored before, kept)" if raw else ""))
        with Progress(STAGE, len(sequences), len(raw), enabled=rt.is_main, unit="sample") as progress:
            raw += score_blocks(model, sequences[len(raw):], cfg, rt, tokenizer.pad_id, progress, usage)
        # Statistics over every scored answer: selecting the best per prompt must not move the scale.
        stats = normalization_stats(cfg.normalization, raw, metadata, str(rm_path))
        selections = {i.name or i.path: i.select for i in cfg.inputs}
        scored = [sequence.input_ids for sequence in encoded]
        marks = selected_per_prompt(samples, raw, selections, scored)
        dropped, ties = len(samples) - len(marks), identical_once_cut(samples, scored, selections)
        samples = [replace(samples[i], selected=mark) for i, mark in marks.items()]
        raw, encoded = [raw[i] for i in marks], [encoded[i] for i in marks]
        normalized = normalize(raw, stats)
        if rt.is_main:
            write_jsonl(rt.stage_dir / LABELED, labeled_records(samples, raw, normalized))
            meta = {"reward_model": str(rm_path), "normalization": cfg.normalization, "stats": stats,
                    "samples": len(samples), "by_source": counts_by_source(samples),
                    "not_selected": dropped, **read_counts(samples, skipped, encoded, max_len, cfg, ties)}
            write_atomic(rt.stage_dir / META, json.dumps(meta, indent=2))
            reward_histogram(raw, normalized, [s.kind for s in samples], rt.stage_dir / "reward_histogram.png",
                             title=f"rewards of {len(samples)} samples ({cfg.normalization} normalization)")
            mark_done(rt, rt.stage_dir / LABELED)
            for name in (SCORES, SCORED_UNDER):  # labeled.jsonl holds them now
                (rt.stage_dir / name).unlink(missing_ok=True)
            rt.log(f"label done: {rt.stage_dir / LABELED}; normalized with mean {stats['mean']:.4f}, "
                   f"std {stats['std']:.4f} ({cfg.normalization}); {meta['truncated']} of {len(samples)} "
                   f"truncated to {max_len} tokens; {describe(meta['skipped_total'])}; "
                   f"{meta['unfinished_kept']} unfinished kept; {not_selected(dropped, ties, max_len)}")
    return 0


def earlier_scores(rt: Runtime, fingerprint: dict) -> list[float]:
    """The raw rewards an earlier execution saved (`score_blocks`), in input order, if it
    scored the same token ids with the same reward model (`fingerprint`); otherwise none (a
    line says what changed). Rank 0 decides and cuts a line a kill tore; every rank reads them."""
    scores, under = rt.stage_dir / SCORES, rt.stage_dir / SCORED_UNDER
    if rt.is_main:
        if scores.exists():
            try:
                if not under.exists():
                    raise ResumeRefused(SCORED_UNDER, "is missing")
                check_resumable(json.loads(under.read_text()), fingerprint, scores)
                _cut_torn_line(scores)
            except ResumeRefused as err:
                rt.log(f"label: scoring again: {err.key} changed since {scores} was written")
                scores.unlink()
        write_atomic(under, json.dumps(fingerprint, indent=2))
    rt.barrier()
    return [score for line in scores.read_text().splitlines() for score in json.loads(line)["scores"]] \
        if scores.exists() else []


def _cut_torn_line(path: Path) -> None:
    """Blocks are appended a line at a time (`append_jsonl_durably`): a kill can tear only
    the last, which is scored again."""
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(len(whole))


def score_blocks(model, sequences: list, cfg: LabelConfig, rt: Runtime, pad_id: int, progress: Progress,
                 usage: Usage) -> list[float]:
    """Raw rewards of `sequences`, `write_every` at a time, each block's appended durably to
    SCORES by rank 0 as soon as every rank has it (`score_sequences` gathers them), and its
    tokens counted in the ledger's heartbeat: an execution that fails or is killed after
    saving blocks is charged for them (a later one goes on from them)."""
    raw = []
    for start in range(0, len(sequences), cfg.write_every):
        block = sequences[start:start + cfg.write_every]
        scores = score_sequences(model, block, cfg.batch_size, rt, pad_id, progress)
        if rt.is_main:
            append_jsonl_durably(rt.stage_dir / SCORES, [{"scores": scores}])
            usage.tokens += sum(map(len, block))
            usage.beat(force=True)
        raw += scores
    return raw


def cut_reason(max_len: int) -> str:
    return f"identical once cut to the reward model's {max_len} tokens"


def not_selected(dropped: int, ties: dict[str, int], max_len: int) -> str:
    """The summary's account of the answers selection left out, and of what the reward
    model's length made identical (`identical_once_cut`): raising data.max_seq_len of the
    reward model is the remedy, and nothing else would say so."""
    text = f"{dropped} not selected (inputs' select"
    if ties["answers"]:
        text += (f"; {ties['answers']} of them identical to another answer once cut to the reward model's {max_len} "
                 f"tokens, leaving {ties['prompts']} prompts one answer: a reward model trained with a larger "
                 "data.max_seq_len would tell them apart")
    text += ")"
    if ties["pairs"]:
        text += f"; {ties['pairs']} preference pairs {cut_reason(max_len)} (kept, scored alike)"
    return text


def read_inputs(cfg: LabelConfig, template) -> tuple[list[Sample], dict[str, dict[str, int]]]:
    """Every input's samples, and per input what was skipped ({reason: count}; cut-off
    generations under UNFINISHED unless include_unfinished)."""
    samples, skipped = [], {}
    for i in cfg.inputs:
        name, skips = i.name or i.path, Skips(strict=cfg.strict)
        read = read_samples(name, i.kind, i.format, i.path, template, i.max_samples, cfg.seed, skips,
                            cfg.include_unfinished, **hub_options(i, i.kind), **source_key(i, "inputs"))
        if not read:  # nothing to score would fail later, far from its cause
            raise DataError(i.path, None, f"expected at least one usable sample ({describe(skips.counts)}; "
                                          "strict=true names the first, include_unfinished=true keeps cut-off ones)")
        samples += read
        skipped[name] = skips.counts
    return samples, skipped


def read_counts(samples: list[Sample], skipped: dict[str, dict[str, int]], encoded, max_len: int,
                cfg: LabelConfig, ties: dict[str, int]) -> dict:
    """labels_meta.json's account of what was not scored as read: skipped records by input
    and reason, their total by reason, truncated samples and unfinished ones kept; and
    (`ties`, `identical_once_cut`) the answers and pairs the length limit made identical."""
    total: dict[str, int] = {}
    for counts in skipped.values():
        for reason, n in counts.items():
            total[reason] = total.get(reason, 0) + n
    return {"skipped": skipped, "skipped_total": total, "strict": cfg.strict,
            "truncated": sum(sample.truncated for sample in encoded), "max_seq_len": max_len,
            "identical_once_cut": {"reason": cut_reason(max_len), **ties},
            "include_unfinished": cfg.include_unfinished,
            "unfinished_kept": sum(s.finished is False for s in samples)}
