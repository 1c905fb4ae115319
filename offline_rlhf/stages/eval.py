"""`orlhf eval`: every model answers the held-out prompts (greedy; Decision-Transformer
models behind their reward prompt at the target score); answers are scored by the gold
reward and/or the reward model; `results.md`/`results.json` hold mean, standard error and
win rate against the baseline (SFT) for each model."""

from __future__ import annotations

import json
from dataclasses import asdict

import torch
import torch.distributed as dist

from offline_rlhf.checkpoint import TOKENIZER_DIR, read_meta, resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.evaluation import EvalConfig, EvalModelConfig
from offline_rlhf.data.prompts import read_prompt_file
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_prompt
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.eval.results import results_markdown, summarize
from offline_rlhf.fsutil import write_atomic, write_jsonl
from offline_rlhf.generation.engine import generate
from offline_rlhf.generation.shards import shard_indices
from offline_rlhf.labeling.scoring import load_reward_model, score_texts, scoring_setup
from offline_rlhf.runtime import Runtime, stage_runtime
from offline_rlhf.stage_support import load_inference_model, mark_done

STAGE = "eval"
RESULTS = "results.json"


def answer_prompts(model_cfg: EvalModelConfig, prompts: list[str], cfg: EvalConfig,
                   rt: Runtime) -> tuple[list[str], int]:
    """The model's answers to every prompt, in order, on every rank (DP replicas split
    them), and the number of tokens this replica generated."""
    key = f"models[{model_cfg.name}].checkpoint"
    path = resolve_checkpoint(model_cfg.checkpoint, key)
    meta = read_meta(path)
    tokenizer = Tokenizer.from_dir(path / TOKENIZER_DIR)
    model = load_inference_model(path, "lm", rt, key)
    template = ChatTemplate(**asdict(cfg.template))
    prefix = "" if model_cfg.reward_prompt is None else template.reward_prompt(model_cfg.reward_prompt)
    replica = rt.mesh.get_local_rank("dp") if rt.mesh is not None else 0
    mine = shard_indices(len(prompts), replica, rt.dims.dp)
    budget = meta.model.max_seq_len - cfg.generation.max_new_tokens
    if budget < 1:
        raise ConfigError("generation.max_new_tokens", f"{cfg.generation.max_new_tokens} leaves no room for a prompt "
                          f"in {model_cfg.name}'s max_seq_len={meta.model.max_seq_len}", "lower it")
    encoded = [encode_prompt(tokenizer, template, prompts[i], prefix)[-budget:] for i in mine]
    outputs = generate(model, encoded, cfg.generation, tokenizer.eos_id, tokenizer.pad_id, rt.device)
    answers = [tokenizer.decode(t[:-1] if t and t[-1] == tokenizer.eos_id else t).strip() for t in outputs]
    return _gather_blocks(answers, rt), _total_over_replicas(sum(map(len, outputs)), rt)


def _total_over_replicas(count: int, rt: Runtime) -> int:
    if rt.dims.dp == 1:
        return count
    total = torch.tensor([count], dtype=torch.long, device=rt.device)
    dist.all_reduce(total, group=rt.mesh.get_group("dp"))
    return int(total.item())


def _gather_blocks(mine: list[str], rt: Runtime) -> list[str]:
    """Concatenate the replicas' contiguous blocks in rank order (= prompt order)."""
    if rt.dims.dp == 1:
        return mine
    blocks: list[list[str]] = [None] * rt.dims.dp  # type: ignore[list-item]
    dist.all_gather_object(blocks, mine, group=rt.mesh.get_group("dp"))
    return [answer for block in blocks for answer in block]


def gold_scores(kind: str, prompts: list[str], answers: list[str]) -> list[float] | None:
    if kind != "embedded_task":
        return None
    from offline_rlhf.data.embedded_task import gold_reward

    return [gold_reward(p, a) for p, a in zip(prompts, answers)]


def main(cfg: EvalConfig) -> int:
    first = read_meta(resolve_checkpoint(cfg.models[0].checkpoint, f"models[{cfg.models[0].name}].checkpoint")).model
    with stage_runtime(STAGE, cfg.run_dir, cfg.parallel, first, cfg) as (rt, usage):
        prompts = read_prompt_file(cfg.prompts, cfg.prompt_key)
        answers = {}
        for model_cfg in cfg.models:
            rt.log(f"eval: {model_cfg.name} answers {len(prompts)} prompts"
                   + (f" (reward prompt {model_cfg.reward_prompt})" if model_cfg.reward_prompt is not None else ""))
            answers[model_cfg.name], generated = answer_prompts(model_cfg, prompts, cfg, rt)
            usage.tokens += generated
        scores = {name: {} for name in answers}
        for name, texts in answers.items():
            gold = gold_scores(cfg.gold, prompts, texts)
            if gold is not None:
                scores[name]["gold"] = gold
        if cfg.rm:
            rm, tokenizer, metadata = load_reward_model(cfg.rm, rt, key="rm")
            template, max_len = scoring_setup(metadata, rm.cfg)
            for name, texts in answers.items():
                scores[name]["rm"] = score_texts(rm, tokenizer, template, list(zip(prompts, texts)), cfg.batch_size,
                                                 rt, max_len)
        table = summarize(scores, cfg.baseline)
        if rt.is_main:
            for name, texts in answers.items():
                write_jsonl(rt.stage_dir / f"answers_{name}.jsonl",
                            [{"prompt": p, "response": a, **{s: scores[name][s][i] for s in scores[name]}}
                             for i, (p, a) in enumerate(zip(prompts, texts))])
            write_atomic(rt.stage_dir / RESULTS, json.dumps({"baseline": cfg.baseline, "table": table}, indent=2))
            write_atomic(rt.stage_dir / "results.md", results_markdown(table, cfg.baseline))
            mark_done(rt, rt.stage_dir / RESULTS)
            rt.log("eval results:\n" + results_markdown(table, cfg.baseline))
    return 0
