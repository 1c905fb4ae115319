"""`orlhf eval`: every model answers the held-out prompts (Decision-Transformer models
behind their reward prompt, at the target score their checkpoint records unless
`reward_prompt` overrides it), `generation.n` sampled answers per prompt; answers are
scored by the gold reward and/or the reward model; `results.md`/`results.json` hold per
model and scorer the mean and standard error, the paired difference from the baseline
(SFT) and the win rate with a bootstrap interval, all over prompts (a prompt's score is the
mean of its answers': its samples are not independent evidence), and how many answers were
cut off at max_new_tokens.

Every checkpoint, the reward model and the gold reward are checked before any model
answers, so a typo in the last model's path costs seconds, not a generation run.

A model's answers are saved (atomically) to `answered/<model>.json` as soon as it has
answered, with what they depend on: a rerun after Ctrl-C or a crash reuses them instead of
answering again, and so does any later run under the same inputs (the files stay: a
rerun with changed settings answers again only with the models they change)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from offline_rlhf.checkpoint import CheckpointMeta, resolve_checkpoint
from offline_rlhf.config.errors import ConfigError, ResumeRefused
from offline_rlhf.config.evaluation import EvalConfig
from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.data.chat_template import paper_template
from offline_rlhf.data.prompts import PromptTurns, read_prompt_file_turns, read_prompt_turns
from offline_rlhf.data.records import turns_field
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import fit_prompt, stop_token_ids
from offline_rlhf.eval.gold import check_prompts, load_gold
from offline_rlhf.eval.results import prompt_means, results_markdown, summarize
from offline_rlhf.fsutil import fsync_dir, write_atomic, write_jsonl
from offline_rlhf.generation.engine import Completion, Request, TokenCallback, answer_text, run
from offline_rlhf.generation.sampling import stream_id
from offline_rlhf.generation.shards import shard_indices
from offline_rlhf.hub import parse_repo_id
from offline_rlhf.labeling.scoring import load_reward_model, score_texts, scoring_setup
from offline_rlhf.ledger import Usage
from offline_rlhf.progress import Progress, quiet_progress
from offline_rlhf.runtime import SAME_INPUTS, Runtime, raise_everywhere, same_on_every_rank, stage_runtime
from offline_rlhf.stage_support import (
    check_resumable,
    checkpoint_digest,
    checkpoint_of_head,
    checkpoint_template,
    checkpoint_tokenizer,
    dt_target,
    load_inference_model,
    mark_done,
    model_fingerprint,
)

STAGE = "eval"
RESULTS = "results.json"
ANSWERED = "answered"  # answered/<model>.json: a model's answers and their inputs (`save_answers`)
ANSWERS_SCHEMA = 1  # what a saved answer is: [response, finished, prompt cut]
T = TypeVar("T")


@dataclass(frozen=True)
class Model:
    """A listed model, checked: its checkpoint step, metadata, chat template and DT target
    (None: no reward prompt)."""

    name: str
    path: Path
    meta: CheckpointMeta
    template: ChatTemplate
    reward_prompt: float | None
    reward_prompt_from: str | None  # "config", "checkpoint" or None


def listed_models(cfg: EvalConfig) -> list[Model]:
    """Every listed checkpoint resolved to a complete `lm` step, or a one-line error naming
    the model and its path, before anything runs. A checkpoint's recorded template wins
    over `template`; a DT checkpoint's recorded target (`dt_target`, an error when a DT
    checkpoint has none) is used unless the model's `reward_prompt` overrides it."""
    models = []
    for model_cfg in cfg.models:
        key = f"models[{model_cfg.name}].checkpoint"
        path = resolve_checkpoint(model_cfg.checkpoint, key)
        meta = checkpoint_of_head(path, "lm", key)
        template = checkpoint_template(path, meta.metadata, cfg.template, key=None)  # a fallback: models differ
        if model_cfg.reward_prompt is not None:
            target, source = model_cfg.reward_prompt, "config"
        else:
            target = dt_target(meta.metadata, path, f"models[{model_cfg.name}].reward_prompt")
            source = None if target is None else "checkpoint"
        models.append(Model(model_cfg.name, path, meta, template, target, source))
    return models


def answer_prompts(model: Model, prompts: list[PromptTurns], cfg: EvalConfig,
                   rt: Runtime) -> tuple[list[tuple[str, bool, bool]], int]:
    """The model's (answer, finished, prompt cut) for every prompt's `generation.n` samples,
    prompt by prompt, on every rank (DP replicas split the prompts; finished is False for an
    answer cut at max_new_tokens; a prompt is cut when it does not fit the model's context
    beside max_new_tokens), and the number of tokens generated."""
    tokenizer = checkpoint_tokenizer(model.path)
    policy = load_inference_model(model.path, "lm", rt, f"models[{model.name}].checkpoint", decoding=True)
    template = model.template
    prefix = "" if model.reward_prompt is None else template.reward_prompt(model.reward_prompt)
    replica = rt.dp_rank
    mine = shard_indices(len(prompts), replica, rt.dims.dp)
    budget = model.meta.model.max_seq_len - cfg.generation.max_new_tokens
    if budget < 1:
        raise ConfigError("generation.max_new_tokens", f"{cfg.generation.max_new_tokens} leaves no room for a prompt "
                          f"in {model.name}'s max_seq_len={model.meta.model.max_seq_len}", "lower it")
    # A conversation too long for the budget loses its oldest exchanges first.
    encoded = [fit_prompt(tokenizer, template, text, budget, prefix, turns)
               for text, turns in (prompts[i] for i in mine)]
    # Sampling keyed by the global prompt index and sample: the same answers at any DP size.
    n = cfg.generation.n
    requests = [Request(ids, stream_id(i, sample), cfg.generation.max_new_tokens)
                for i, (ids, _) in zip(mine, encoded) for sample in range(n)]
    with Progress(answering(model.name, rt), len(requests), enabled=rt.is_main, unit="answer") as bar:
        completions = run(policy, requests, cfg.generation, stop_token_ids(tokenizer, template), tokenizer.pad_id,
                          rt.device, decode=tokenizer.decode, on_token=count_answers(bar))
    if rt.dims.dp > 1:
        rt.log(f"eval {model.name}: replica 0 answered its share; waiting for the other replicas")
    answers = [(answer_text(c, tokenizer.decode, cfg.generation.stop), c.finish != "length", encoded[row // n][1])
               for row, c in enumerate(completions)]
    rt.barrier()  # the replicas' shares take their time: wait without the process group's timeout
    return _gather_blocks(answers, rt), _total_over_replicas(sum(len(c.tokens) for c in completions), rt)


def answering(name: str, rt: Runtime) -> str:
    """What rank 0's progress of a model's answers counts: its own replica's share, as the
    replicas write nothing until every one has answered (`_gather_blocks`); with several, it
    says so rather than pass its share off as the whole."""
    return f"eval {name}" if rt.dims.dp == 1 else f"eval {name} (replica 0's share, of {rt.dims.dp} replicas)"


def count_answers(bar: Progress) -> TokenCallback:
    """An engine callback that moves `bar` on by one whenever an answer ends."""
    def on_token(_: int, completion: Completion) -> None:
        if completion.finish:
            bar.update()
    return on_token


def _total_over_replicas(count: int, rt: Runtime) -> int:
    if rt.dims.dp == 1:
        return count
    total = torch.tensor([count], dtype=torch.long, device=rt.device)
    dist.all_reduce(total, group=rt.mesh.get_group("dp"))
    return int(total.item())


def _gather_blocks(mine: list[T], rt: Runtime) -> list[T]:
    """Concatenate the replicas' contiguous blocks in rank order (= prompt order)."""
    if rt.dims.dp == 1:
        return mine
    blocks: list[list[T]] = [None] * rt.dims.dp  # type: ignore[list-item]
    dist.all_gather_object(blocks, mine, group=rt.mesh.get_group("dp"))
    return [answer for block in blocks for answer in block]


def on_main(rt: Runtime, make: Callable[[], T]) -> T | None:
    """`make()` on rank 0 only (None elsewhere); its failure fails every rank, which would
    otherwise wait for rank 0 in the next collective."""
    value, problem = None, None
    if rt.is_main:
        try:
            value = make()
        except ConfigError as err:
            problem = err
    raise_everywhere(problem, rt.device, "load the gold reward", key="gold", group=rt.wait_group)  # may download
    return value


def held_out_prompts(cfg: EvalConfig) -> list[PromptTurns]:
    """`prompts` as a JSONL file or the prompts of a hub dataset's split (`prompts_kind`),
    with the turns of multi-turn ones."""
    if parse_repo_id(cfg.prompts, "prompts") is None:
        return read_prompt_file_turns(cfg.prompts, cfg.prompt_key)
    return read_prompt_turns(cfg.prompts_kind, "hf", cfg.prompts, paper_template(cfg.template), cfg.prompt_key,
                             key="prompts",
                             split=cfg.prompts_split)


def main(cfg: EvalConfig) -> int:
    models = listed_models(cfg)
    if cfg.rm:
        checkpoint_of_head(resolve_checkpoint(cfg.rm, "rm"), "value", "rm")
    template = paper_template(cfg.template)  # the gold reward scores plain paper-format text
    with stage_runtime(STAGE, cfg.run_dir, cfg.parallel, models[0].meta.model, cfg) as (rt, usage):
        prompts = held_out_prompts(cfg)
        same_on_every_rank(rt, {"prompts": len(prompts), "sha256": prompts_sha256(prompts)}, "prompts",
                           "held-out prompts", SAME_INPUTS)  # each replica answers its block of them
        rows = [prompt for prompt in prompts for _ in range(cfg.generation.n)]  # one per answer
        texts, turns = [text for text, _ in rows], [history for _, history in rows]
        check_prompts(cfg.gold, cfg.prompts, cfg.prompt_key)
        gold = on_main(rt, lambda: load_gold(cfg.gold, rt.device, cfg.batch_size, template))
        answers, finished, cut = {}, {}, {}
        for model in models:
            answers[model.name], finished[model.name], cut[model.name] = model_answers(model, prompts, cfg, rt, usage)
        scores = {name: {} for name in answers}
        if cfg.rm:
            for name, values in reward_model_scores(cfg, rt, answers, finished, texts, turns).items():
                scores[name]["rm"] = values
        if rt.is_main:
            if gold is not None:  # after the collectives: a plug-in's error stops rank 0 alone
                for name, replies in answers.items():  # the gold reward reads paper-format text: the folded prompt
                    with quiet_progress(f"eval gold {name}", len(replies), "answer") as bar:
                        scores[name] = {"gold": gold.score(list(zip(texts, replies)), finished[name], bar),
                                        **scores[name]}
            write_results(rt, cfg, models, prompts, answers, finished, cut, scores)
    return 0


def model_answers(model: Model, prompts: list[PromptTurns], cfg: EvalConfig, rt: Runtime,
                  usage: Usage) -> tuple[list[str], list[bool], list[bool]]:
    """The model's answers, whether each finished, and whether its prompt was cut (a row per
    answer, on every rank): those an earlier run saved under the same inputs (`usage` then
    continues that run), else answered now (their tokens counted into `usage`) and saved."""
    inputs = answer_inputs(model, prompts, cfg) if rt.is_main else None
    answered = saved_answers(model, inputs, rt)
    usage.resumed = usage.resumed or answered is not None  # continues an earlier execution's answers
    if answered is None:
        rt.log(f"eval: {model.name} answers {len(prompts)} prompts" + (
            f" ({cfg.generation.n} samples each)" if cfg.generation.n > 1 else "") + (
            f" (reward prompt {model.reward_prompt:.1f} from the {model.reward_prompt_from})"
            if model.reward_prompt is not None else ""))
        answered, generated = answer_prompts(model, prompts, cfg, rt)
        usage.tokens += generated
        if rt.is_main:
            save_answers(answered_path(rt, model), inputs, answered)
    replies, finished, cut = (list(column) for column in zip(*answered))
    if any(cut):
        rt.log(f"eval: {sum(cut) // cfg.generation.n} of {len(prompts)} prompts were cut to fit "
               f"{model.name}'s context (max_seq_len {model.meta.model.max_seq_len} - max_new_tokens "
               f"{cfg.generation.max_new_tokens}): a conversation's oldest exchanges first, then its start")
    return replies, finished, cut


def reward_model_scores(cfg: EvalConfig, rt: Runtime, answers: dict[str, list[str]], finished: dict[str, list[bool]],
                        texts: list[str], turns: list) -> dict[str, list[float]]:
    """Per model, the reward model `cfg.rm`'s score of each answer to its prompt `texts`
    (with their `turns`), in its own template (every rank takes part)."""
    rm, tokenizer, metadata = load_reward_model(cfg.rm, rt, key="rm")
    rm_template, max_len = scoring_setup(metadata, rm.cfg, tokenizer)
    scores = {}
    for name, replies in answers.items():
        with quiet_progress(f"eval rm {name}", len(replies), "answer") as bar:  # counts every rank's
            scores[name] = score_texts(rm, tokenizer, rm_template, list(zip(texts, replies)), cfg.batch_size, rt,
                                       max_len, finished=finished[name], turns=turns, progress=bar)
    return scores


@dataclass(frozen=True)
class AnswerInputs:
    """What a model's answers depend on besides its checkpoint, which `model_fingerprint`
    adds as generate's shards have it: the step folder resolved, and its identity (another
    training's step saved under the same name differs). Settings that leave every answer as
    it is (`generation.batch_size`, CUDA graphs...) drop out as they do there."""

    run_dir: str
    generation: GenerationConfig
    template: ChatTemplate
    reward_prompt: float | None
    prompts_sha256: str
    schema: int = ANSWERS_SCHEMA


def answer_inputs(model: Model, prompts: list[PromptTurns], cfg: EvalConfig) -> dict[str, object]:
    inputs = AnswerInputs(cfg.run_dir, cfg.generation, model.template, model.reward_prompt, prompts_sha256(prompts))
    return model_fingerprint(inputs, model.path)


def prompts_sha256(prompts: list[PromptTurns]) -> str:
    return hashlib.sha256(json.dumps([[text, turns_field(turns)] for text, turns in prompts]).encode()).hexdigest()


def answered_path(rt: Runtime, model: Model) -> Path:
    return rt.stage_dir / ANSWERED / f"{model.name}.json"


def save_answers(path: Path, inputs: dict[str, object], answered: list[tuple[str, bool, bool]]) -> None:
    """A model's answers and their `inputs`, durably (temporary sibling, fsync, rename, fsync
    of the folder). In the stage folder, which a run never clears: they outlive Ctrl-C."""
    write_atomic(path, json.dumps({"inputs": inputs, "answers": answered}))
    fsync_dir(path.parent)


def saved_answers(model: Model, inputs: dict[str, object] | None, rt: Runtime) -> list | None:
    """The model's answers an earlier run saved under the same `inputs`, or None: answer
    again. Rank 0 reads and decides; every rank gets its answers (or None)."""
    found = _matching_answers(answered_path(rt, model), inputs, model.name, rt) if rt.is_main else None
    if rt.group is not None:
        box = [found]
        dist.broadcast_object_list(box, src=0, group=rt.group)
        found = box[0]
    return found


def _matching_answers(path: Path, inputs: dict[str, object], name: str, rt: Runtime) -> list | None:
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        check_resumable(saved["inputs"], inputs, path)
    except ResumeRefused as err:
        rt.log(f"eval {name}: answering again: {err.key} changed since {path} was written")
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # not as this stage writes it
        rt.log(f"eval {name}: answering again: {path} is unreadable ({err})")
        return None
    written = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    rt.log(f"eval {name}: reusing its {len(saved['answers'])} answers from {path} (written {written})")
    return saved["answers"]


def write_results(rt: Runtime, cfg: EvalConfig, models: list[Model], prompts: list[PromptTurns],
                  answers: dict[str, list[str]], finished: dict[str, list[bool]], cut: dict[str, list[bool]],
                  scores: dict[str, dict[str, list[float]]]) -> None:
    """answers_<model>.jsonl per model (a line per answer: `generation.n` per prompt, each
    with its `sample` index), results.json / results.md, DONE (rank 0)."""
    n = cfg.generation.n
    rows = [prompt for prompt in prompts for _ in range(n)]
    for name, texts in answers.items():
        write_jsonl(rt.stage_dir / f"answers_{name}.jsonl",
                    [{"prompt": p, **turns_field(history), "sample": i % n, "response": a,
                      "finished": finished[name][i], "prompt_truncated": cut[name][i],
                      **{s: scores[name][s][i] for s in scores[name]}}
                     for i, ((p, history), a) in enumerate(zip(rows, texts))])
    per_prompt = {name: {scorer: prompt_means(values, n) for scorer, values in by_scorer.items()}
                  for name, by_scorer in scores.items()}
    table = summarize(per_prompt, cfg.baseline, cfg.bootstrap_samples)
    cut_off = {name: flags.count(False) for name, flags in finished.items()}
    configured = {m.name: m.checkpoint for m in cfg.models}  # the report checks them against what was evaluated
    info = {m.name: {"checkpoint": str(m.path.absolute()), "configured": str(Path(configured[m.name]).absolute()),
                     "checkpoint_sha256": checkpoint_digest(m.path), "reward_prompt": m.reward_prompt,
                     "reward_prompt_from": m.reward_prompt_from, "cut_off": cut_off[m.name],
                     "prompts_truncated": sum(cut[m.name]) // n} for m in models}
    # run_dir: the report maps the absolute paths above into the run folder where it finds them
    # (a run folder moved whole keeps its device-hours beside its evaluation).
    results = {"run_dir": str(Path(cfg.run_dir).absolute()), "baseline": cfg.baseline, "prompts": len(prompts),
               "samples_per_prompt": n, "answers": len(prompts) * n, "gold": cfg.gold,
               "rm": str(Path(cfg.rm).absolute()) if cfg.rm else cfg.rm,
               "max_new_tokens": cfg.generation.max_new_tokens, "models": info, "table": table}
    markdown = results_markdown(table, cfg.baseline, cut_off, len(prompts) * n)
    write_atomic(rt.stage_dir / RESULTS, json.dumps(results, indent=2))
    write_atomic(rt.stage_dir / "results.md", markdown)
    mark_done(rt, rt.stage_dir / RESULTS)
    rt.log(f"eval results (cut off: answers that reached max_new_tokens={cfg.generation.max_new_tokens}):\n"
           + markdown)
