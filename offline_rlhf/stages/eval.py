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
from offline_rlhf.data.records import iter_json_objects, require_text
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_prompt
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.eval.results import results_markdown, summarize
from offline_rlhf.fsutil import write_atomic, write_jsonl
from offline_rlhf.generation.engine import Request, answer_text, run, stop_on_strings
from offline_rlhf.generation.sampling import stream_id
from offline_rlhf.generation.shards import shard_indices
from offline_rlhf.labeling.scoring import load_reward_model, score_texts, scoring_setup
from offline_rlhf.runtime import Runtime, stage_runtime
from offline_rlhf.stage_support import load_inference_model, mark_done

STAGE = "eval"
RESULTS = "results.json"


def answer_prompts(model_cfg: EvalModelConfig, prompts: list[str], cfg: EvalConfig,
                   rt: Runtime) -> tuple[list[str], int]:
    """The model's (answer, finished) for every prompt, in order, on every rank (DP replicas
    split them; finished is False for an answer cut at max_new_tokens), and the number of
    tokens generated."""
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
    # Sampling keyed by the global prompt index: the same answers at any DP size.
    requests = [Request(ids, stream_id(i, 0), cfg.generation.max_new_tokens) for i, ids in zip(mine, encoded)]
    completions = run(model, requests, cfg.generation, tokenizer.eos_id, tokenizer.pad_id, rt.device,
                      stop=stop_on_strings(tokenizer.decode, cfg.generation.stop))
    answers = [(answer_text(c, tokenizer.decode, cfg.generation.stop), c.finish != "length") for c in completions]
    return _gather_blocks(answers, rt), _total_over_replicas(sum(len(c.tokens) for c in completions), rt)


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


def check_gold_prompts(kind: str, path: str, prompt_key: str) -> None:
    """Before any model answers: the gold reward scores only its own task's instructions, so
    a prompt it cannot parse (another data set's, an over-long one) is one line naming its
    file:line, the prompt shortened."""
    if kind != "embedded_task":
        return
    from offline_rlhf.data.embedded_task import parse_instruction, shortened

    for where, record in iter_json_objects(path):
        text = require_text(record, prompt_key, where)
        try:
            parse_instruction(text)
        except ValueError:
            raise where.error(f"expected an embedded-task instruction such as 'add 3 and 4' for gold=embedded_task, "
                              f"got {shortened(text)}; use the task's prompts (run_dir/task/) or "
                              "leave gold empty") from None


def main(cfg: EvalConfig) -> int:
    first = read_meta(resolve_checkpoint(cfg.models[0].checkpoint, f"models[{cfg.models[0].name}].checkpoint")).model
    with stage_runtime(STAGE, cfg.run_dir, cfg.parallel, first, cfg) as (rt, usage):
        prompts = read_prompt_file(cfg.prompts, cfg.prompt_key)
        check_gold_prompts(cfg.gold, cfg.prompts, cfg.prompt_key)
        answers, finished = {}, {}
        for model_cfg in cfg.models:
            rt.log(f"eval: {model_cfg.name} answers {len(prompts)} prompts"
                   + (f" (reward prompt {model_cfg.reward_prompt})" if model_cfg.reward_prompt is not None else ""))
            answered, generated = answer_prompts(model_cfg, prompts, cfg, rt)
            answers[model_cfg.name], finished[model_cfg.name] = [a for a, _ in answered], [f for _, f in answered]
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
                                                 rt, max_len, finished=finished[name])
        table = summarize(scores, cfg.baseline)
        if rt.is_main:
            for name, texts in answers.items():
                write_jsonl(rt.stage_dir / f"answers_{name}.jsonl",
                            [{"prompt": p, "response": a, "finished": finished[name][i],
                              **{s: scores[name][s][i] for s in scores[name]}}
                             for i, (p, a) in enumerate(zip(prompts, texts))])
            write_atomic(rt.stage_dir / RESULTS, json.dumps({"baseline": cfg.baseline, "table": table}, indent=2))
            write_atomic(rt.stage_dir / "results.md", results_markdown(table, cfg.baseline))
            mark_done(rt, rt.stage_dir / RESULTS)
            rt.log("eval results:\n" + results_markdown(table, cfg.baseline))
    return 0
