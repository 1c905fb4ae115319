"""Run the judge: read the inputs, build the matches of the chosen format, send the
requests the call log lacks (`judge.concurrency` at a time), append each finished match's
judgments to `judgments_<format>.jsonl` as it completes, and summarize. A judgment the judge
could not give (calls.py's `error`) is a record like any other, counted in the summary, or
with `strict` an error naming its question and model."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.judging import JudgeConfig
from offline_rlhf.data.errors import DataError
from offline_rlhf.eval.judge.calls import Answered, CallLog
from offline_rlhf.eval.judge.client import CONTEXT_TOO_LONG, JudgeClient, api_key
from offline_rlhf.eval.judge.inputs import read_answers, read_judge_prompts, read_questions
from offline_rlhf.eval.judge.matches import Match, Request, Setup, pair_matches, paper_matches, single_matches
from offline_rlhf.eval.judge.summary import (
    pairwise_summary,
    paper_summary,
    plot_scores,
    results_markdown,
    single_summary,
    unusable_line,
)
from offline_rlhf.fsutil import append_jsonl_durably, write_atomic, write_jsonl

CALLS = "calls.jsonl"
PROGRESS_EVERY_S = 10.0


def judgments_file(fmt: str) -> str:
    return f"judgments_{fmt}.jsonl"


def load_setup(cfg: JudgeConfig) -> tuple[Setup, dict[str, int]]:
    """The inputs, and per model the answer lines that answer no listed question."""
    questions = read_questions(cfg.questions)
    answers, unmatched = {}, {}
    for entry in cfg.answers:
        found = read_answers(entry.path, questions)
        missing = [q.question_id for q in questions if q.question_id not in found.turns]
        if missing:
            raise DataError(entry.path, None, f"expected an answer to every question of {cfg.questions} "
                                              f"({len(missing)} missing, the first question_id {missing[0]!r})")
        answers[entry.model], unmatched[entry.model] = found.turns, found.unmatched
    references = read_answers(cfg.reference_answers, questions).turns if cfg.reference_answers else {}
    prompts = read_judge_prompts(cfg.judge_prompts) if cfg.judge_prompts else {}
    return Setup(questions, answers, references, prompts, cfg.judge.model, cfg.judge.temperature,
                 cfg.judge.max_tokens), unmatched


def missing_second_turns(setup: Setup, models: list[str]) -> dict[str, int]:
    """Per model, the two-turn questions it answered with one turn (their turn 2 is not judged)."""
    two_turns = [q for q in setup.questions if len(q.turns) == 2]
    return {m: sum(len(setup.answers[m][q.question_id]) < 2 for q in two_turns) for m in models}


def key_exposure(cfg: JudgeConfig, key: str | None) -> str | None:
    """A warning when the key would cross the network unencrypted."""
    parts = urlsplit(cfg.judge.base_url)
    if key and parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return f"judge: warning: the API key goes to {parts.hostname} over plain http; use https"
    return None


def build_matches(cfg: JudgeConfig, setup: Setup) -> list[Match]:
    models = [entry.model for entry in cfg.answers]
    if cfg.format == "single":
        return single_matches(setup, models)
    if cfg.format == "pairwise":
        return pair_matches(setup, models, cfg.baseline)
    return paper_matches(setup, models, cfg.seed)


def _replies(match: Match, log: CallLog) -> list[Answered] | None:
    replies = [log.answered.get(r.key) for r in match.requests]
    return None if None in replies else replies


def match_records(match: Match, replies: list[Answered], strict: bool) -> list[dict]:
    """The match's judgment records; with `strict`, an unusable reply is an error instead."""
    if strict and (bad := next((r for r in replies if r.error), None)):
        raise ConfigError("strict", f"question_id {match.question.question_id!r} turn {match.turn}, "
                          f"{' vs '.join(match.models)}: the judge gave no usable judgment ({bad.error}: {bad.detail})",
                          "set strict=false to skip and count such judgments (they are logged: a rerun does not "
                          "resend them)")
    return match.records(replies)


async def send_missing(matches: list[Match], log: CallLog, client: JudgeClient, concurrency: int,
                       on_match: Callable[[Match], None], say: Callable[[str], None]) -> int:
    """Send every request of `matches` that the log lacks; `on_match` runs once a match has
    all its replies. Returns the number of requests sent. The first request that fails for
    good stops the others (an error that will repeat for every request) and is raised."""
    waiting: dict[str, list[Match]] = {}
    pending: dict[str, Request] = {}
    for match in matches:
        for request in match.requests:
            if request.key not in log.answered:
                pending.setdefault(request.key, request)
                matches_of = waiting.setdefault(request.key, [])
                if not matches_of or matches_of[-1] is not match:  # both orders of a pair may ask the same
                    matches_of.append(match)
    queue = list(pending.values())[::-1]  # popped from the end: sent in match order
    total, last_said = len(queue), time.monotonic()

    async def worker() -> None:
        nonlocal last_said
        while queue:
            request = queue.pop()
            reply = await client.chat(request.messages)
            log.append(Answered(request.key, reply.content, reply.retries, reply.prompt_tokens,
                                reply.completion_tokens, time.time(), reply.error, reply.detail, client.base_url))
            for match in waiting.pop(request.key):
                if _replies(match, log) is not None:
                    on_match(match)
            if time.monotonic() - last_said >= PROGRESS_EVERY_S:
                last_said = time.monotonic()
                say(f"judge: {total - len(queue)}/{total} requests sent")

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, total))]
    try:
        await asyncio.gather(*workers)
    finally:  # after a failure: stop the other workers before the error propagates
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return total


def summarize(cfg: JudgeConfig, records: list[dict]) -> dict:
    models = [entry.model for entry in cfg.answers]
    if cfg.format == "single":
        return single_summary(records, models, cfg.baseline)
    if cfg.format == "paper":
        return paper_summary(records, models, cfg.baseline)
    return pairwise_summary(records)


def run_judge(cfg: JudgeConfig, out: Path, say: Callable[[str], None] = print) -> dict:
    """Judge everything `cfg` asks for into `out` and return the results (also written as
    results.json, results.md and scores.png)."""
    start = time.monotonic()
    setup, unmatched = load_setup(cfg)
    matches = build_matches(cfg, setup)
    key = api_key(cfg.judge)
    if warning := key_exposure(cfg, key):
        say(warning)
    log = CallLog(out / CALLS)
    path = out / judgments_file(cfg.format)
    # What earlier runs finished, once each; new matches are appended as they complete.
    strict = cfg.strict
    write_jsonl(path, [r for m in matches if (replies := _replies(m, log)) for r in match_records(m, replies, strict)])
    sent_before = sum(_replies(m, log) is not None for m in matches)
    say(f"judge: {len(matches)} {cfg.format} matches, {sent_before} already judged; asking {cfg.judge.model} "
        f"at {cfg.judge.base_url}")
    for url, count in reused_elsewhere(matches, log, cfg.judge.base_url).items():
        say(f"judge: {count} judgments reused were made by {cfg.judge.model} at {url} (a judgment is keyed by the "
            "judge's model name, not its address); give judge.model another name, or delete judge/calls.jsonl, "
            "to judge them again")

    async def judge() -> int:
        async with JudgeClient(cfg.judge, key) as client:
            return await send_missing(matches, log, client, cfg.judge.concurrency,
                                      lambda m: append_jsonl_durably(path, match_records(m, _replies(m, log), strict)),
                                      say)

    sent = asyncio.run(judge())
    replies = [_replies(m, log) for m in matches]
    _require_a_usable_reply(replies, cfg)
    records = [r for m, rs in zip(matches, replies) for r in m.records(rs)]
    write_jsonl(path, records)  # the same records, now in match order
    results = {**_header(cfg, setup, len(matches), len(records), sent), **_costs(replies),
               "answers_to_unlisted_questions": unmatched, "wall_seconds": round(time.monotonic() - start, 3),
               "summary": summarize(cfg, records)}
    if unusable := results["summary"]["unusable"]:
        hint = ("; a prompt plus judge.max_tokens past the judge's context: a lower judge.max_tokens or a longer-"
                "context judge may fit it" if any(CONTEXT_TOO_LONG in r for r in unusable.values()) else "")
        say(f"judge: {unusable_line(unusable)} skipped (strict=true makes them errors{hint})")
    write_results(out, results)
    return results


def write_results(out: Path, results: dict) -> None:
    """results.json (strict JSON: a non-finite number in it is a bug, raised before anything
    is written), results.md and scores.png."""
    write_atomic(out / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_atomic(out / "results.md", results_markdown(results))
    plot_scores(results, out / "scores.png")


def reused_elsewhere(matches: list[Match], log: CallLog, base_url: str) -> dict[str, int]:
    """Per other endpoint, the logged replies this run reuses that it answered."""
    here = base_url.rstrip("/")
    replies = _distinct([_replies(m, log) or [] for m in matches])
    return dict(Counter(a.base_url for a in replies if a.base_url and a.base_url != here))


def _require_a_usable_reply(replies: list[list[Answered]], cfg: JudgeConfig) -> None:
    """A run in which no request got a usable judgment judged nothing: its setting is wrong
    (every prompt plus judge.max_tokens past the judge's context, or a judge that writes no
    text), not its inputs; it fails rather than write an empty table and DONE."""
    used = _distinct(replies)
    if not used or any(not a.error for a in used):
        return
    too_long = sum(a.error == CONTEXT_TOO_LONG for a in used)
    if too_long:
        raise ConfigError("judge.max_tokens", f"{cfg.judge.max_tokens}: all {len(used)} requests were refused by "
                          f"{cfg.judge.base_url} ({too_long} past its context; first: {next(iter(used)).detail})",
                          "lower judge.max_tokens, or use a judge with a longer context")
    raise ConfigError("judge.model", f"{cfg.judge.model} at {cfg.judge.base_url} answered none of the {len(used)} "
                      f"requests with text (first: {next(iter(used)).detail})", "use a judge that writes its verdict")


def _header(cfg: JudgeConfig, setup: Setup, matches: int, judgments: int, sent: int) -> dict:
    models = [e.model for e in cfg.answers]
    return {"format": cfg.format, "judge_model": cfg.judge.model, "base_url": cfg.judge.base_url,
            "baseline": cfg.baseline, "models": models, "questions": len(setup.questions), "matches": matches,
            "judgments": judgments, "sent": sent,
            "second_turns_not_judged": {} if cfg.format == "paper" else missing_second_turns(setup, models)}


def _distinct(replies: list[list[Answered]]) -> list[Answered]:
    """Each reply once (a reply may serve several matches: the paper format's)."""
    return list({a.key: a for rs in replies for a in rs}.values())


def _costs(replies: list[list[Answered]]) -> dict:
    """Retries and tokens over the replies the judgments rest on (each reply once)."""
    used = _distinct(replies)
    return {"retries": sum(a.retries for a in used), "prompt_tokens": sum(a.prompt_tokens for a in used),
            "completion_tokens": sum(a.completion_tokens for a in used)}
