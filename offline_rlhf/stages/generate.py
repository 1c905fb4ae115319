"""`orlhf generate`: responses of the SFT model to a mix of prompts (paper step 3).

Each data-parallel replica (TP=1 by default, so every device is a replica) takes a
disjoint block of the prompts not answered yet, decodes them in one continuous batch and
appends answers as they end, `write_every` prompts at a time, to its own
`shard_XXXXX.jsonl` with fsync. A rerun after a crash has rank 0 read every
shard once (a torn last line is cut off first) and hand the answered prompt ids to every
replica, which skips them and never answers one twice. When all replicas are done, rank 0
merges the shards into `samples.jsonl` (ordered by prompt id, each id exactly once: the
shards' lines copied, never all in memory) and writes `DONE`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

from offline_rlhf.checkpoint import read_meta, resolve_checkpoint
from offline_rlhf.config.errors import ConfigError, ResumeRefused
from offline_rlhf.config.samples import GenerateConfig
from offline_rlhf.config.schema import ModelConfig
from offline_rlhf.data.prompts import Prompt, read_prompt_mix
from offline_rlhf.data.records import turns_field
from offline_rlhf.data.skips import describe
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import TokenIds, fit_prompt, stop_token_ids
from offline_rlhf.fsutil import append_jsonl_durably, atomic_file, write_atomic
from offline_rlhf.generation.engine import Completion, Request, answer_text, run
from offline_rlhf.generation.sampling import stream_id
from offline_rlhf.generation.shards import (
    RESTART,
    ShardIndex,
    my_share,
    new_records,
    resume_shards,
    show_shards,
    wait_for_replicas,
)
from offline_rlhf.progress import Progress
from offline_rlhf.runtime import SAME_INPUTS, Runtime, same_on_every_rank, stage_runtime
from offline_rlhf.stage_checks import load_tokenizer
from offline_rlhf.stage_support import (
    checkpoint_template,
    load_inference_model,
    local_init,
    mark_done,
    model_config,
    model_fingerprint,
)

STAGE = "generate"
SCHEMA_VERSION = 3  # 2: `sample` (index among the n answers of a prompt) and `finish_reason`; 3: `turns`
SAMPLES = "samples.jsonl"


class AnswerWriter:
    """Takes each answer from the engine as it ends; once all `generation.n` answers of a
    prompt have ended, their records are due, and every `write_every` prompts they are
    appended to the shard with fsync (a prompt's answers together, so a crash leaves at
    most one prompt incomplete, which a resume cuts: `kept_records`)."""

    def __init__(self, prompts: list[Prompt], truncated: list[bool], cfg: GenerateConfig,
                 tokenizer, model_name: str, shard: Path | None, show: Callable[[], None] | None):
        self.prompts, self.truncated, self.cfg = prompts, truncated, cfg  # truncated: per prompt, cut to the budget
        self.tokenizer, self.model_name, self.shard = tokenizer, model_name, shard
        self.show = show  # rank 0's: every replica's answers so far into the heartbeat and the bar (`show_shards`)
        self.ended: dict[int, dict[int, Completion]] = {}  # prompt index -> sample -> its completion
        self.due: list[dict] = []
        self.tokens = 0

    def on_token(self, request: int, completion: Completion) -> None:
        if not completion.finish:
            return
        prompt_index, sample = divmod(request, self.cfg.generation.n)
        samples = self.ended.setdefault(prompt_index, {})
        samples[sample] = completion
        if len(samples) == self.cfg.generation.n:
            self.due += self.records(prompt_index, [samples[j] for j in range(len(samples))])
            del self.ended[prompt_index]
            if len(self.due) >= self.cfg.write_every * self.cfg.generation.n:
                self.flush()

    def records(self, prompt_index: int, completions: list[Completion]) -> list[dict]:
        prompt, gen = self.prompts[prompt_index], self.cfg.generation
        self.tokens += sum(len(c.tokens) for c in completions)
        return [{"schema": SCHEMA_VERSION, "id": prompt.id, "sample": sample, "prompt": prompt.text,
                 **turns_field(prompt.turns),
                 "response": answer_text(completion, self.tokenizer.decode, gen.stop), "source": prompt.source,
                 "model": self.model_name, "gen_config": asdict(gen), "finished": completion.finish != "length",
                 "finish_reason": completion.finish, "response_tokens": len(completion.tokens),
                 "prompt_truncated": self.truncated[prompt_index]}
                for sample, completion in enumerate(completions)]

    def flush(self) -> None:
        if not self.due:
            return
        if self.shard is not None:
            append_jsonl_durably(self.shard, self.due)
        self.due = []
        if self.show is not None:
            self.show()


def prompt_budget(cfg: GenerateConfig, model_cfg: ModelConfig) -> int:
    """The longest prompt (`fit_prompt`: a conversation's oldest exchanges go first, then its
    first tokens): what max_prompt_tokens and the room the model has left after
    max_new_tokens allow."""
    budget = min(cfg.max_prompt_tokens, model_cfg.max_seq_len - cfg.generation.max_new_tokens)
    if budget < 1:
        raise ConfigError("generation.max_new_tokens", f"{cfg.generation.max_new_tokens} leaves no room for a prompt "
                          f"in the model's max_seq_len={model_cfg.max_seq_len}", "lower it")
    return budget


def main(cfg: GenerateConfig) -> int:
    init = local_init(cfg.init, cfg.run_dir)  # a Hugging Face model is imported once, into the run
    model_cfg = model_config(init, ModelConfig())
    with stage_runtime(STAGE, cfg.run_dir, cfg.parallel, model_cfg, cfg) as (rt, usage):
        tokenizer, _ = load_tokenizer(init, model_cfg)
        checkpoint = resolve_checkpoint(init.checkpoint, "init.checkpoint")
        template = checkpoint_template(checkpoint, read_meta(checkpoint).metadata, cfg.template)
        prompts, mix_stats = read_prompt_mix(cfg.sources, template, cfg.total_prompts, cfg.seed, cfg.strict)
        same_on_every_rank(rt, {"prompts": len(prompts), "sha256": prompts_sha256(prompts)}, "sources", "prompts",
                           SAME_INPUTS)  # each replica answers its block of them, by position
        done = resume_shards(rt, model_fingerprint(cfg, checkpoint), cfg.generation.n, SCHEMA_VERSION,
                             partial(check_answered_prompts, prompts=prompts, stage_dir=rt.stage_dir))
        counted = new_records(rt, lambda record: record.get("response_tokens", 0)) if rt.is_main else None
        usage.resumed = bool(done)  # continues the answers of earlier executions (charged with this one)
        todo = [p for p in prompts if p.id not in done]
        mine, shard = my_share(rt, todo)
        repeats = sum(stats["repeated"] for stats in mix_stats.values())
        repeated = f"{repeats} of them repeats to reach total_prompts; " if repeats else ""
        rt.log(f"generate: {len(prompts)} prompts ({repeated}unusable records: {describe(skip_counts(mix_stats))}), "
               f"{len(done)} already answered, "
               f"{len(todo)} to go on {rt.dims.dp} replica(s) of TP={rt.dims.tp}")
        model = load_inference_model(checkpoint, "lm", rt, "init.checkpoint", decoding=True)
        started = time.perf_counter()
        # Rank 0's bar counts every replica's answers (the shards'), from those before this execution.
        with Progress("generate", len(prompts), initial=len(done), enabled=rt.is_main, unit="prompt") as bar:
            show = partial(show_shards, counted, usage, bar, cfg.generation.n) if rt.is_main else None
            usage.tokens = _generate_all(model, mine, cfg, tokenizer, template, rt, str(checkpoint), shard, show)
            wait_for_replicas(rt, show)
        if rt.is_main:
            write_outputs(rt, cfg, (prompts, mix_stats, done), str(checkpoint), prompt_budget(cfg, model_cfg), usage,
                          time.perf_counter() - started)
    return 0


def prompts_sha256(prompts: list[Prompt]) -> str:
    """The digest of the prompts as one JSON list, hashed prompt by prompt (the whole list in
    one string was 900 MB at a million prompts): `json.dumps` of a list is its items' joined
    by ", " in brackets. Resume fingerprints hold it: it must not change."""
    digest = hashlib.sha256(b"[")
    for k, p in enumerate(prompts):
        item = json.dumps([p.id, p.text, p.source, turns_field(p.turns)])
        digest.update(f"{', ' if k else ''}{item}".encode())
    digest.update(b"]")
    return digest.hexdigest()


def write_outputs(rt: Runtime, cfg: GenerateConfig, inputs: tuple, checkpoint: str, budget: int, usage,
                  seconds: float) -> None:
    """Rank 0, after every replica: the merged answers, the card, DONE, the summary line.
    `inputs`: the prompts, their sources' stats and the ids answered before this run."""
    prompts, mix_stats, done = inputs
    counts = Counter()
    merged = ShardIndex(rt.stage_dir, len(prompts), cfg.generation.n, partial(count_samples, counts, done))
    with atomic_file(rt.stage_dir / SAMPLES, "wb") as out:
        out.writelines(merged.lines())  # the shards' lines as written: what `json.dumps` of their records gives
    usage.tokens = counts["new_tokens"]  # every replica's
    card = {"prompts": len(prompts), "sources": mix_stats, "skipped": skip_counts(mix_stats),
            "model": checkpoint, "finished": counts["finished"], "prompt_truncated": counts["prompt_truncated"],
            "gen_config": asdict(cfg.generation)}
    write_atomic(rt.stage_dir / "generation_card.json", json.dumps(card, indent=2))
    mark_done(rt, rt.stage_dir / SAMPLES)
    answers = len(prompts) * cfg.generation.n
    rt.log(f"generate done: {answers} answers to {len(prompts)} prompts in {rt.stage_dir / SAMPLES}; "
           f"{usage.tokens} new tokens in {seconds:.1f} s ({usage.tokens / max(seconds, 1e-9):.0f} tokens/s over "
           f"{rt.dims.dp} replica(s)); {answers - card['finished']} hit max_new_tokens without EOS, "
           f"{card['prompt_truncated']} of {len(prompts)} prompts were cut to {budget} tokens; unusable prompt "
           f"records: {describe(card['skipped'])}")


def count_samples(counts: Counter, done: set[int], record: dict) -> None:
    """The card's counts of a merged record into `counts`, and its tokens when new (not
    answered before this run)."""
    counts["finished"] += record["finished"]
    # a prompt's n answers share its (cut) prompt: count it once
    counts["prompt_truncated"] += record["prompt_truncated"] and record["sample"] == 0
    counts["new_tokens"] += record["response_tokens"] if record["id"] not in done else 0


def skip_counts(mix_stats: dict) -> dict[str, int]:
    """The sources' unusable records (`read_prompt_mix` stats) by reason, all sources together."""
    return dict(sum((Counter(stats["skipped"]) for stats in mix_stats.values()), Counter()))


def check_answered_prompts(records: Iterable[dict], prompts: list[Prompt], stage_dir: Path) -> Iterator[dict]:
    """The shard `records`, passed on; at their end, refused if any does not answer the
    prompt that has its id now (text and turns). Records are resumed by prompt id, a
    position in the mix: the prompt sources changed since it was written (the config names
    files, not their content) and the answers would go to other prompts. Checked before
    anything is generated, as rank 0 reads the shards (`resume_shards`)."""
    changed, first = set(), None  # the ids; the first record of the lowest
    for record in records:
        prompt_id = record["id"]
        if not 0 <= prompt_id < len(prompts) or (record["prompt"], record.get("turns")) != (
                prompts[prompt_id].text, turns_field(prompts[prompt_id].turns).get("turns")):
            changed.add(prompt_id)
            first = record if first is None or prompt_id < first["id"] else first
        yield record
    if changed:
        now = (f"now {prompts[first['id']].text[:60]!r}" if 0 <= first["id"] < len(prompts)
               else f"and there are {len(prompts)} prompts now")
        raise ResumeRefused("sources", f"the prompt inputs changed since the shards in {stage_dir} were written: "
                            f"{len(changed)} answered prompt ids now ask another prompt or none (first: prompt "
                            f"{first['id']} was {first['prompt'][:60]!r}, {now})",
                            f"restore them, or {RESTART.format(stage_dir=stage_dir)}")


def _generate_all(model, prompts: list[Prompt], cfg: GenerateConfig, tokenizer, template: ChatTemplate, rt: Runtime,
                  model_name: str, shard: Path | None, show: Callable[[], None] | None) -> int:
    """Answers to `prompts` in one engine run (decode slots stay busy until the last
    answers; runs per chunk would drain the batch at every chunk's end), written as they
    end and then dropped (memory holds the answers in flight, not the replica's share).
    Sampling streams are keyed by (prompt id, sample index): the answers do not depend on
    the slot or replica a prompt lands in. `show`: rank 0's progress after each write.
    Returns the number of new tokens."""
    limit, gen = prompt_budget(cfg, model.cfg), cfg.generation
    requests, truncated = [], []
    for prompt in prompts:
        ids, cut = fit_prompt(tokenizer, template, prompt.text, limit, turns=prompt.turns)
        ids = TokenIds(ids)  # 4 bytes a token, shared by the prompt's n requests (a list: ~36)
        truncated.append(cut)
        requests += [Request(ids, stream_id(prompt.id, sample), gen.max_new_tokens) for sample in range(gen.n)]
    writer = AnswerWriter(prompts, truncated, cfg, tokenizer, model_name, shard, show)
    run(model, requests, gen, stop_token_ids(tokenizer, template), tokenizer.pad_id, rt.device,
        decode=tokenizer.decode, on_token=writer.on_token, keep_tokens=False)
    writer.flush()
    return writer.tokens
