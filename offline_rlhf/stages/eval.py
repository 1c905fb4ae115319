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

While a model answers, each data-parallel replica appends its answers as they end to its
own shard, `answering/<model>/shard_XXXXX.jsonl`, with fsync (generate's shards): a kill
(a time limit, preemption) loses the answers in flight and at most about a second of ended
ones, and a rerun under the same inputs answers only the prompts no shard holds. Rank 0's
progress counts every replica's answers, from the shards. Once all have answered, rank 0
merges the shards into `answered/<model>.json` (atomically), with what the answers depend
on, and removes them: a rerun after Ctrl-C or a crash reuses it instead of answering
again, and so does any later run under the same inputs (the files stay: a rerun with
changed settings answers again only with the models they change; the shards of a killed
run under other inputs are deleted, never resumed)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, TypeVar

import torch.distributed as dist

from offline_rlhf.checkpoint import CheckpointMeta, resolve_checkpoint
from offline_rlhf.checkpoint_meta import checkpoint_of_head
from offline_rlhf.config.errors import ConfigError, ResumeRefused
from offline_rlhf.config.evaluation import EvalConfig
from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.data.chat_template import paper_template
from offline_rlhf.data.errors import DataError
from offline_rlhf.data.prompts import PromptTurns, read_prompt_file_turns, read_prompt_turns
from offline_rlhf.data.records import turns_field
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import fit_prompt, stop_token_ids
from offline_rlhf.eval.gold import check_prompts, load_gold
from offline_rlhf.eval.results import prompt_means, results_markdown, summarize
from offline_rlhf.fsutil import append_jsonl_durably, fsync_dir, write_atomic, write_jsonl
from offline_rlhf.generation.engine import Completion, Request, answer_text, run
from offline_rlhf.generation.sampling import stream_id
from offline_rlhf.generation.shards import (
    FINGERPRINT,
    ShardIndex,
    my_share,
    new_records,
    resume_shards,
    shard_paths,
    show_shards,
    wait_for_replicas,
)
from offline_rlhf.hub import parse_repo_id
from offline_rlhf.labeling.scoring import load_reward_model, score_texts, scoring_setup
from offline_rlhf.ledger import Usage
from offline_rlhf.progress import Progress, quiet_progress
from offline_rlhf.runtime import SAME_INPUTS, Runtime, raise_everywhere, same_on_every_rank, stage_runtime
from offline_rlhf.stage_support import (
    check_resumable,
    checkpoint_digest,
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
ANSWERING = "answering"  # answering/<model>/shard_XXXXX.jsonl: a model's answers so far, per replica
SHARD_SCHEMA = 1  # what a shard record is: id (prompt index), sample, response, finished, prompt_truncated, tokens
WRITE_EVERY_S = 1.0  # a replica appends its ended answers to its shard at most this often: what a kill loses
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


def answer_prompts(model: Model, prompts: list[PromptTurns], cfg: EvalConfig, rt: Runtime,
                   inputs: dict[str, object] | None, usage: Usage) -> list[list]:
    """The model's [answer, finished, prompt cut] for every prompt's `generation.n` samples,
    prompt by prompt, on every rank (finished is False for an answer cut at max_new_tokens;
    a prompt is cut when it does not fit the model's context beside max_new_tokens). DP
    replicas split the prompts an earlier, killed run under the same `inputs` left
    unanswered (`resume_answers`) and append their answers to their shards as they end
    (`ShardWriter`); rank 0's bar counts every replica's, its ledger heartbeat their tokens
    (into `usage`). Rank 0 then merges the shards, saves the answers and removes them."""
    shards = answering_rt(rt, model)
    done = resume_answers(shards, model, inputs, cfg.generation.n)
    usage.resumed = usage.resumed or bool(done)  # continues the answers of a killed execution
    todo = [i for i in range(len(prompts)) if i not in done]
    rt.log(f"eval: {model.name} answers {len(todo)} prompts" + (
        f" ({cfg.generation.n} samples each)" if cfg.generation.n > 1 else "") + (
        f" (reward prompt {model.reward_prompt:.1f} from the {model.reward_prompt_from})"
        if model.reward_prompt is not None else "") + (
        f"; {len(done)} of {len(prompts)} were answered before, in {shards.stage_dir}" if done else ""))
    mine, shard = my_share(shards, todo)
    # Before the model loads: the records other replicas write meanwhile are new ones too.
    counted = new_records(shards, lambda record: record.get("response_tokens", 0)) if rt.is_main else None
    answer = load_share(model, prompts, mine, cfg, rt) if todo else None  # the same on every rank
    before = usage.tokens  # the models' before this one
    n = cfg.generation.n
    with Progress(f"eval {model.name}", len(prompts) * n, initial=len(done) * n, enabled=rt.is_main,
                  unit="answer") as bar:
        show = partial(show_shards, counted, usage, bar, before=before) if rt.is_main else None  # every replica's
        if answer is not None:
            answer(shard, show)
        wait_for_replicas(rt, show)
    answered, tokens = merged_answers(shards, answered_path(rt, model), inputs, len(prompts), n, done)
    usage.tokens = before + tokens  # every replica's (rank 0's count: its row is the ledger's)
    return answered


def answering_rt(rt: Runtime, model: Model) -> Runtime:
    """`rt` with the model's shard folder, `answering/<model>/`, as the folder the shard
    functions work in (its shards and their fingerprint)."""
    return replace(rt, stage_dir=rt.stage_dir / ANSWERING / model.name)


def resume_answers(shards: Runtime, model: Model, inputs: dict[str, object] | None, n: int) -> set[int]:
    """The prompts a killed run under the same `inputs` answered (every sample) in the
    model's shards (`resume_shards`: a torn last write is cut); shards of other inputs (a
    changed setting, prompts or checkpoint step) are deleted first, as saved answers are not
    reused under them."""
    if shards.is_main:
        shards.stage_dir.mkdir(parents=True, exist_ok=True)  # before the others wait for `done`
        if (stale := stale_shards(shards.stage_dir, inputs)) is not None:
            shards.log(f"eval {model.name}: deleted the unfinished answers in {shards.stage_dir}: {stale}")
            delete_shards(shards.stage_dir)
    return resume_shards(shards, inputs, n, SHARD_SCHEMA)


def stale_shards(folder: Path, inputs: dict[str, object]) -> str | None:
    """Why the shards in `folder` answer other inputs than `inputs` (None: they do not, or
    there are none)."""
    if not shard_paths(folder):
        return None
    path = folder / FINGERPRINT
    try:
        check_resumable(json.loads(path.read_text()), inputs, path)
    except ResumeRefused as err:
        return f"{err.key} changed since they were written"
    except (OSError, ValueError, TypeError, AttributeError) as err:  # not as this stage writes it
        return f"{path} is unreadable ({err})"
    return None


def load_share(model: Model, prompts: list[PromptTurns], mine: list[int], cfg: EvalConfig,
               rt: Runtime) -> Callable[[Path | None, Callable[[], None] | None], None]:
    """The model loaded and this replica's prompts `mine` (indices into `prompts`) encoded;
    returns `answer(shard, show)`, which answers them in one engine run, each prompt's
    answers appended to `shard` as they end (`ShardWriter`)."""
    tokenizer = checkpoint_tokenizer(model.path)
    policy = load_inference_model(model.path, "lm", rt, f"models[{model.name}].checkpoint", decoding=True)
    template = model.template
    prefix = "" if model.reward_prompt is None else template.reward_prompt(model.reward_prompt)
    budget = model.meta.model.max_seq_len - cfg.generation.max_new_tokens
    if budget < 1:
        raise ConfigError("generation.max_new_tokens", f"{cfg.generation.max_new_tokens} leaves no room for a prompt "
                          f"in {model.name}'s max_seq_len={model.meta.model.max_seq_len}", "lower it")
    # A conversation too long for the budget loses its oldest exchanges first.
    encoded = [fit_prompt(tokenizer, template, prompts[i][0], budget, prefix, prompts[i][1]) for i in mine]
    # Sampling keyed by the global prompt index and sample: the same answers at any DP size and
    # after a resume, whichever replica and batch a prompt lands in.
    n = cfg.generation.n
    requests = [Request(ids, stream_id(i, sample), cfg.generation.max_new_tokens)
                for i, (ids, _) in zip(mine, encoded) for sample in range(n)]

    def answer(shard: Path | None, show: Callable[[], None] | None) -> None:
        writer = ShardWriter(mine, [cut for _, cut in encoded], n, (tokenizer.decode, cfg.generation.stop), shard,
                             show)
        try:
            if requests:
                run(policy, requests, cfg.generation, stop_token_ids(tokenizer, template), tokenizer.pad_id,
                    rt.device, decode=tokenizer.decode, on_token=writer.on_token, keep_tokens=False)
        finally:
            writer.flush()  # on a stop too (Ctrl-C, a signal): the prompts whose answers all ended are kept
    return answer


class ShardWriter:
    """Takes each answer from the engine as it ends; once all `n` answers of a prompt have
    ended, their records are due, and they are appended to the replica's shard with fsync
    (a prompt's answers together: a kill leaves at most one prompt incomplete, which the
    resume cuts) at most every WRITE_EVERY_S seconds: what a kill loses beside the answers in
    flight.
    `mine`: each row's prompt index (a row: a prompt's n requests); `cut`: whether it was cut;
    `text`: the tokenizer's decode and the stop strings; `show`: rank 0's progress, after
    each of its writes."""

    def __init__(self, mine: list[int], cut: list[bool], n: int, text: tuple[Callable, list[str]],
                 shard: Path | None, show: Callable[[], None] | None):
        self.mine, self.cut, self.n, (self.decode, self.stops) = mine, cut, n, text
        self.shard, self.show = shard, show
        self.ended: dict[int, dict[int, dict]] = {}  # row of `mine` -> sample -> its record
        self.due: list[dict] = []
        self.written = time.monotonic()

    def on_token(self, request: int, completion: Completion) -> None:
        if completion.finish:
            row, sample = divmod(request, self.n)
            samples = self.ended.setdefault(row, {})
            samples[sample] = {"schema": SHARD_SCHEMA, "id": self.mine[row], "sample": sample,
                               "response": answer_text(completion, self.decode, self.stops),
                               "finished": completion.finish != "length", "prompt_truncated": self.cut[row],
                               "response_tokens": len(completion.tokens)}
            if len(samples) == self.n:
                self.due += [samples[j] for j in range(self.n)]
                del self.ended[row]
        if self.due and time.monotonic() - self.written >= WRITE_EVERY_S:
            self.flush()

    def flush(self) -> None:
        # Taken before the write: a Ctrl-C during it must not have the `finally` write them
        # again (a torn write stays the last line, which the resume cuts).
        due, self.due, self.written = self.due, [], time.monotonic()
        if due and self.shard is not None:
            append_jsonl_durably(self.shard, due)
        if self.show is not None:
            self.show()


def merged_answers(shards: Runtime, saved: Path, inputs: dict[str, object] | None, n_prompts: int, n: int,
                   done: set[int]) -> tuple[list[list], int]:
    """Rank 0, once every replica has answered: the shards' answers in prompt order (every
    (prompt, sample) once, `ShardIndex`), saved to `saved` (`save_answers`) before the
    shards are removed, and the tokens of those this execution answered (not in `done`).
    Every rank gets the answers."""
    answered, tokens, problem = None, [0], None

    def count(record: dict) -> None:
        tokens[0] += record["response_tokens"] if record["id"] not in done else 0
    if shards.is_main:
        try:
            index = ShardIndex(shards.stage_dir, n_prompts, n, count)
            answered = [[r["response"], r["finished"], r["prompt_truncated"]] for r in map(json.loads, index.lines())]
            save_answers(saved, inputs, answered)
            remove_shards(shards.stage_dir)
        except (ConfigError, DataError) as err:  # answers missing or twice: one line naming the folder
            problem = err
    raise_everywhere(problem, shards.device, "merge the answers", group=shards.wait_group)
    return on_every_rank(shards, answered), tokens[0]


def delete_shards(folder: Path) -> None:
    """A model's shards and their fingerprint."""
    for path in (*shard_paths(folder), folder / FINGERPRINT):
        path.unlink(missing_ok=True)


def remove_shards(folder: Path) -> None:
    """A model's shard folder, once its answers are saved (and `answering/` once empty)."""
    delete_shards(folder)
    with contextlib.suppress(OSError):  # a file of someone else's there, or another model's shards
        folder.rmdir()
        folder.parent.rmdir()


def on_every_rank(rt: Runtime, value: T | None) -> T | None:
    """Rank 0's `value` on every rank."""
    if rt.group is not None:
        box = [value]
        dist.broadcast_object_list(box, src=0, group=rt.group)
        value = box[0]
    return value


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
        # Checked now; an hf_rm's weights are on the device only while it scores, after every model answered.
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
    continues that run), else answered now (their tokens counted into `usage`; a killed
    run's answers under the same inputs are resumed) and saved."""
    inputs = answer_inputs(model, prompts, cfg) if rt.is_main else None
    answered = saved_answers(model, inputs, rt)
    usage.resumed = usage.resumed or answered is not None  # continues an earlier execution's answers
    if answered is None:
        answered = answer_prompts(model, prompts, cfg, rt, inputs, usage)
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


def save_answers(path: Path, inputs: dict[str, object], answered: list[list]) -> None:
    """A model's answers and their `inputs`, durably (temporary sibling, fsync, rename, fsync
    of the folder). In the stage folder, which a run never clears: they outlive Ctrl-C."""
    write_atomic(path, json.dumps({"inputs": inputs, "answers": answered}))
    fsync_dir(path.parent)


def saved_answers(model: Model, inputs: dict[str, object] | None, rt: Runtime) -> list | None:
    """The model's answers an earlier run saved under the same `inputs`, or None: answer
    again. Rank 0 reads and decides; every rank gets its answers (or None)."""
    found = _matching_answers(answered_path(rt, model), inputs, model.name, rt) if rt.is_main else None
    return on_every_rank(rt, found)


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
