"""`orlhf generate`: responses of the SFT model to a mix of prompts (paper step 3).

Each data-parallel replica (TP=1 by default, so every device is a replica) takes a
disjoint block of the prompts not answered yet and appends its answers, a batch at a
time, to its own `shard_XXXXX.jsonl` with fsync. A rerun after a crash reads every
shard, skips answered prompt ids and never answers one twice; a torn last line is cut
off first. When all replicas are done, rank 0 merges the shards into `samples.jsonl`
(ordered by prompt id, each id exactly once) and writes `DONE`.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

from offline_rlhf.checkpoint import read_meta, resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.samples import GenerateConfig
from offline_rlhf.config.schema import ModelConfig
from offline_rlhf.data.prompts import Prompt, read_prompt_mix
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_prompt, stop_token_ids
from offline_rlhf.fsutil import write_atomic, write_jsonl
from offline_rlhf.generation.engine import Request, answer_text, run, stop_on_strings
from offline_rlhf.generation.sampling import stream_id
from offline_rlhf.generation.shards import append_durably, merge_shards, my_share, resume_shards
from offline_rlhf.progress import Progress
from offline_rlhf.runtime import Runtime, stage_runtime
from offline_rlhf.stage_support import (
    checkpoint_template,
    load_inference_model,
    load_tokenizer,
    local_init,
    mark_done,
    model_config,
    resume_fingerprint,
)

STAGE = "generate"
SCHEMA_VERSION = 2  # 2: `sample` (index among the n answers of a prompt) and `finish_reason`
SAMPLES = "samples.jsonl"


def answer(model, prompts: list[Prompt], cfg: GenerateConfig, tokenizer, template: ChatTemplate, rt: Runtime,
           model_name: str) -> tuple[list[dict], int]:
    """Records for `prompts` (`generation.n` per prompt, sample by sample) and the number of
    new tokens. Sampling streams are keyed by (prompt id, sample index): the answers do
    not depend on which chunk, slot or replica a prompt lands in."""
    limit, gen = prompt_budget(cfg, model.cfg), cfg.generation
    encoded = [encode_prompt(tokenizer, template, p.text) for p in prompts]
    requests = [Request(ids[-limit:], stream_id(p.id, sample), gen.max_new_tokens)
                for p, ids in zip(prompts, encoded) for sample in range(gen.n)]
    completions = run(model, requests, gen, stop_token_ids(tokenizer, template), tokenizer.pad_id, rt.device,
                      stop=stop_on_strings(tokenizer.decode, gen.stop))
    records = []
    for (prompt, ids), sample in itertools.product(zip(prompts, encoded), range(gen.n)):
        completion = completions[len(records)]
        records.append({"schema": SCHEMA_VERSION, "id": prompt.id, "sample": sample, "prompt": prompt.text,
                        "response": answer_text(completion, tokenizer.decode, gen.stop), "source": prompt.source,
                        "model": model_name, "gen_config": asdict(gen), "finished": completion.finish != "length",
                        "finish_reason": completion.finish, "response_tokens": len(completion.tokens),
                        "prompt_truncated": len(ids) > limit})
    return records, sum(len(c.tokens) for c in completions)


def prompt_budget(cfg: GenerateConfig, model_cfg: ModelConfig) -> int:
    """Prompt tokens kept (the most recent ones): what max_prompt_tokens and the room the
    model has left after max_new_tokens allow."""
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
        prompts, mix_stats = read_prompt_mix(cfg.sources, template, cfg.total_prompts, cfg.seed)
        done = resume_shards(rt, resume_fingerprint(cfg), cfg.generation.n)
        todo = [p for p in prompts if p.id not in done]
        mine, shard = my_share(rt, todo)
        rt.log(f"generate: {len(prompts)} prompts, {len(done)} already answered, {len(todo)} to go on "
               f"{rt.dims.dp} replica(s) of TP={rt.dims.tp}")
        model = load_inference_model(checkpoint, "lm", rt, "init.checkpoint", decoding=True)
        usage.tokens = _generate_all(model, mine, cfg, tokenizer, template, rt, str(checkpoint), shard, usage)
        rt.barrier()
        if rt.is_main:
            records = merge_shards(rt.stage_dir, len(prompts), cfg.generation.n)
            write_jsonl(rt.stage_dir / SAMPLES, records)
            card = {"prompts": len(prompts), "sources": mix_stats, "model": str(checkpoint),
                    "finished": sum(r["finished"] for r in records),
                    "prompt_truncated": sum(r["prompt_truncated"] for r in records),
                    "gen_config": asdict(cfg.generation)}
            write_atomic(rt.stage_dir / "generation_card.json", json.dumps(card, indent=2))
            mark_done(rt, rt.stage_dir / SAMPLES)
            rt.log(f"generate done: {len(records)} answers to {len(prompts)} prompts in {rt.stage_dir / SAMPLES}; "
                   f"{len(records) - card['finished']} hit max_new_tokens without EOS, "
                   f"{card['prompt_truncated']} prompts were cut to {prompt_budget(cfg, model_cfg)} tokens")
    return 0


def _generate_all(model, prompts: list[Prompt], cfg: GenerateConfig, tokenizer, template, rt: Runtime,
                  model_name: str, shard: Path | None, usage) -> int:
    total_tokens = 0
    started = time.perf_counter()
    bar = Progress("generate", len(prompts), enabled=rt.is_main, unit="prompt")
    for start in range(0, len(prompts), cfg.write_every):
        records, tokens = answer(model, prompts[start:start + cfg.write_every], cfg, tokenizer, template, rt,
                                 model_name)
        if shard is not None:
            append_durably(shard, records)
        total_tokens += tokens
        usage.tokens = total_tokens
        usage.beat()
        bar.update(len(records) // cfg.generation.n, tok_s=f"{total_tokens / (time.perf_counter() - started):.0f}")
    bar.close()
    return total_tokens
