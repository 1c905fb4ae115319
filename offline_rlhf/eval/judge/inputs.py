"""The judge's inputs in FastChat's llm_judge formats: questions (`question_id`, `category`,
`turns`), answers (`question_id`, `choices[0].turns`; or `orlhf eval`'s `prompt`/`response`
lines), reference answers, and the judge prompt file. Texts are kept byte for byte (never
stripped): the judge prompts must be rendered exactly as FastChat renders them."""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from offline_rlhf.data.errors import Location
from offline_rlhf.data.records import iter_json_objects, require_field

QuestionId = int | str


@dataclass(frozen=True)
class Question:
    question_id: QuestionId
    category: str
    turns: tuple[str, ...]


@dataclass(frozen=True)
class JudgePrompt:
    """One line of FastChat's judge_prompts.jsonl."""

    name: str
    type: str  # "single" or "pairwise"
    system_prompt: str
    prompt_template: str
    output_format: str  # "[[rating]]" or "[[A]]"


@dataclass
class AnswerFile:
    """A model's answers by question id, and how many lines answered no listed question."""

    turns: dict[QuestionId, tuple[str, ...]]
    unmatched: int = 0


def _question_id(record: dict[str, Any], where: Location) -> QuestionId:
    value = record.get("question_id")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise where.error(f"expected 'question_id' to be an integer or a string (got {type(value).__name__})")
    return value


def _texts(value: Any, key: str, where: Location) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise where.error(f"expected {key!r} to be a non-empty list of strings")
    return tuple(value)


def read_questions(path: str) -> list[Question]:
    """The questions in file order; a question id may appear once."""
    questions, seen = [], {}
    for where, record in iter_json_objects(path):
        qid = _question_id(record, where)
        if qid in seen:
            raise where.error(f"expected a new question_id ({qid!r} is already on line {seen[qid]})")
        seen[qid] = where.record
        category = record.get("category", "")
        if not isinstance(category, str):
            raise where.error(f"expected 'category' to be a string (got {type(category).__name__})")
        questions.append(Question(qid, category, _texts(record.get("turns"), "turns", where)))
    return questions


def read_answers(path: str, questions: list[Question]) -> AnswerFile:
    """A FastChat answer file, or `orlhf eval`'s answers (matched to the questions by their
    `question_id` when present, else by prompt text: eval strips its prompts, so the first
    turn is compared stripped; repeated question texts take the answers in order). Of an
    eval run with several samples per prompt (`generation.n`), the first is judged."""
    by_text: dict[str, deque[QuestionId]] = defaultdict(deque)
    for question in questions:
        by_text[question.turns[0].strip()].append(question.question_id)
    known = {q.question_id for q in questions}
    answers, first_line, unmatched = {}, {}, 0
    for where, record in iter_json_objects(path):
        if record.get("sample", 0) != 0:
            continue
        qid, turns = _answer(record, where, by_text)
        if qid is None or qid not in known:
            unmatched += 1
            continue
        if qid in answers:
            raise where.error(f"expected one answer per question (question_id {qid!r} is already answered on "
                              f"line {first_line[qid]})")
        answers[qid], first_line[qid] = turns, where.record
    return AnswerFile(answers, unmatched)


def _answer(record: dict[str, Any], where: Location,
            by_text: dict[str, deque[QuestionId]]) -> tuple[QuestionId | None, tuple[str, ...]]:
    if "choices" in record:
        choices = record["choices"]
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise where.error("expected 'choices' to be a non-empty list of objects")
        return _question_id(record, where), _texts(choices[0].get("turns"), "choices[0].turns", where)
    if "response" in record:
        response = require_field(record, "response", str, where)
        if "question_id" in record:
            return _question_id(record, where), (response,)
        pending = by_text.get(require_field(record, "prompt", str, where).strip())
        return (pending.popleft() if pending else None), (response,)
    raise where.error("expected a FastChat answer (question_id, choices) or an `orlhf eval` answer "
                      "(prompt, response)")


def read_judge_prompts(path: str) -> dict[str, JudgePrompt]:
    prompts = {}
    for where, record in iter_json_objects(path):
        fields = {key: require_field(record, key, str, where)
                  for key in ("name", "type", "system_prompt", "prompt_template", "output_format")}
        prompts[fields["name"]] = JudgePrompt(**fields)
    return prompts
