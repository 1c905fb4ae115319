"""What to ask the judge, one match at a time, and the judgment records each match becomes
in FastChat's judgment format (so FastChat's show_result reads them): a single-answer
grading (one call), a pairwise game (two calls: both orders of the answers) or a paper
round (one call showing every model's answer to a question)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.eval.judge.calls import Answered, call_key
from offline_rlhf.eval.judge.inputs import JudgePrompt, Question
from offline_rlhf.eval.judge.parsing import parse_paper_scores, parse_rating, parse_verdict
from offline_rlhf.eval.judge.prompts import (
    LETTERS,
    PAPER_PROMPT_NAME,
    judge_prompt_name,
    messages,
    needs_reference,
    paper_order,
    render_pair,
    render_paper,
    render_single,
)
from offline_rlhf.eval.judge.ranking import rank_scores

Answers = dict[str, dict]  # model -> {question_id: turns}


@dataclass(frozen=True)
class Request:
    key: str
    messages: list[dict[str, str]]


@dataclass
class Match:
    """One unit of judgment: its requests, and how their replies become records."""

    kind: str  # "single", "pairwise" or "paper"
    question: Question
    turn: int
    models: tuple[str, ...]  # single: (model,); pairwise: (model_1, model_2); paper: the shown order
    judge: tuple[str, str]  # (judge model, prompt name), as FastChat records it
    user_prompts: tuple[str, ...]
    requests: tuple[Request, ...] = field(default=())

    def records(self, replies: Sequence[Answered]) -> list[dict]:
        return {"single": _single_record, "pairwise": _pair_record, "paper": _paper_records}[self.kind](self, replies)


@dataclass(frozen=True)
class Setup:
    """Everything the matches are built from."""

    questions: list[Question]
    answers: Answers
    references: dict  # question_id -> reference turns
    judge_prompts: dict[str, JudgePrompt]
    judge_model: str
    temperature: float
    max_tokens: int


def _request(setup: Setup, system_prompt: str, user_prompt: str) -> Request:
    chat = messages(system_prompt, user_prompt)
    return Request(call_key(setup.judge_model, chat, setup.temperature, setup.max_tokens), chat)


def _template(setup: Setup, kind: str, question: Question, turn: int) -> JudgePrompt:
    name = judge_prompt_name(kind, question, turn)
    prompt = setup.judge_prompts.get(name)
    if prompt is None:
        raise ConfigError("judge_prompts", f"has no prompt named {name!r}", "pass FastChat's judge_prompts.jsonl")
    expected = {"single": ("single", "[[rating]]"), "pairwise": ("pairwise", "[[A]]")}[kind]
    if (prompt.type, prompt.output_format) != expected:
        raise ConfigError("judge_prompts", f"prompt {name!r} is a {prompt.type} prompt answering "
                          f"{prompt.output_format}, expected {expected[0]} answering {expected[1]}")
    return prompt


def _reference(setup: Setup, question: Question, turn: int) -> tuple[str, ...] | None:
    if not needs_reference(question):
        return None
    reference = setup.references.get(question.question_id)
    if reference is None or len(reference) < turn:
        raise ConfigError("reference_answers", f"has no turn-{turn} reference answer to question_id "
                          f"{question.question_id!r} (category {question.category}, graded against a reference "
                          "as FastChat does)", "pass reference_answers=FILE (FastChat format) that answers it")
    return reference


def _turns(setup: Setup, question: Question, models: Sequence[str]) -> list[int]:
    """Turn 1, and turn 2 where the question has two turns and every model answered both."""
    two = len(question.turns) == 2 and all(len(setup.answers[m][question.question_id]) >= 2 for m in models)
    return [1, 2] if two else [1]


def single_matches(setup: Setup, models: Sequence[str]) -> list[Match]:
    matches = []
    for question in setup.questions:
        for model in models:
            answer = setup.answers[model][question.question_id]
            for turn in _turns(setup, question, [model]):
                prompt = _template(setup, "single", question, turn)
                user = render_single(prompt, question, answer, turn, _reference(setup, question, turn))
                matches.append(Match("single", question, turn, (model,), (setup.judge_model, prompt.name), (user,),
                                     (_request(setup, prompt.system_prompt, user),)))
    return matches


def model_pairs(models: Sequence[str], baseline: str) -> list[tuple[str, str]]:
    """FastChat's games: (model, baseline) for every other model, or every pair in order."""
    if baseline:
        return [(m, baseline) for m in models if m != baseline]
    return [(a, b) for i, a in enumerate(models) for b in models[i + 1:]]


def pair_matches(setup: Setup, models: Sequence[str], baseline: str) -> list[Match]:
    matches = []
    for question in setup.questions:
        for model_1, model_2 in model_pairs(models, baseline):
            answer_1 = setup.answers[model_1][question.question_id]
            answer_2 = setup.answers[model_2][question.question_id]
            for turn in _turns(setup, question, [model_1, model_2]):
                prompt = _template(setup, "pairwise", question, turn)
                reference = _reference(setup, question, turn)
                users = (render_pair(prompt, question, answer_1, answer_2, turn, reference),
                         render_pair(prompt, question, answer_2, answer_1, turn, reference))
                matches.append(Match("pairwise", question, turn, (model_1, model_2),
                                     (setup.judge_model, prompt.name), users,
                                     tuple(_request(setup, prompt.system_prompt, u) for u in users)))
    return matches


def paper_matches(setup: Setup, models: Sequence[str], seed: int) -> list[Match]:
    """One round per question (first turn only, as the paper judged single prompts)."""
    matches = []
    for question in setup.questions:
        order = paper_order(models, question.question_id, seed)
        user = render_paper(question.turns[0], [setup.answers[m][question.question_id][0] for m in order])
        matches.append(Match("paper", question, 1, tuple(order), (setup.judge_model, PAPER_PROMPT_NAME), (user,),
                             (_request(setup, "", user),)))
    return matches


def _single_record(match: Match, replies: Sequence[Answered]) -> list[dict]:
    reply = replies[0]
    return [{"question_id": match.question.question_id, "model": match.models[0], "judge": list(match.judge),
             "user_prompt": match.user_prompts[0], "judgment": reply.judgment, "score": parse_rating(reply.judgment),
             "turn": match.turn, "tstamp": reply.tstamp, **_error(reply)}]


def _error(reply: Answered, name: str = "error") -> dict:
    """`{name: why}` for an unusable reply (its judgment is "$ERROR$", which parses as -1 or
    "error" as in FastChat), nothing for a usable one: the records keep FastChat's fields."""
    return {name: reply.error} if reply.error else {}


def _pair_record(match: Match, replies: Sequence[Answered]) -> list[dict]:
    """Game 1 shows model_1 as A, game 2 shows model_2 as A; winners are named as FastChat
    names them (model_1, model_2, tie, error)."""
    g1, g2 = (parse_verdict(r.judgment) for r in replies)
    g1 = {"A": "model_1", "B": "model_2"}.get(g1, g1)
    g2 = {"A": "model_2", "B": "model_1"}.get(g2, g2)
    return [{"question_id": match.question.question_id, "model_1": match.models[0], "model_2": match.models[1],
             "g1_winner": g1, "g2_winner": g2, "judge": list(match.judge),
             "g1_user_prompt": match.user_prompts[0], "g1_judgment": replies[0].judgment,
             "g2_user_prompt": match.user_prompts[1], "g2_judgment": replies[1].judgment,
             "turn": match.turn, "tstamp": max(r.tstamp for r in replies),
             **_error(replies[0], "g1_error"), **_error(replies[1], "g2_error")}]


def _paper_records(match: Match, replies: Sequence[Answered]) -> list[dict]:
    """One record per model: its score, parsed under its anonymous letter and attributed
    back through the shown order, and its rank score within the question."""
    reply = replies[0]
    letters = LETTERS[:len(match.models)]
    by_letter = parse_paper_scores(reply.judgment, letters)
    scores = {model: by_letter[letter] for letter, model in zip(letters, match.models)}
    ranks = rank_scores(scores)
    return [{"question_id": match.question.question_id, "model": model, "judge": list(match.judge),
             "user_prompt": match.user_prompts[0], "judgment": reply.judgment, "score": scores[model],
             "turn": 1, "tstamp": reply.tstamp, "assistant": letter, "order": list(match.models),
             "rank_score": None if ranks is None else ranks[model], **_error(reply)}
            for letter, model in zip(letters, match.models)]
