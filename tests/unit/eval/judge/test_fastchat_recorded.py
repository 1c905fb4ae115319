"""FastChat's own recorded MT-bench judgments (the skycamp example, judged by GPT-4): every
user prompt GPT-4 saw is rendered byte for byte from the question and answer files the
judgments were made from (see ../shared/data/MANIFEST.md), both orders of each pair, and
every recorded judgment parses to the recorded score or winner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offline_rlhf.eval.judge.calls import Answered
from offline_rlhf.eval.judge.inputs import read_answers, read_judge_prompts, read_questions
from offline_rlhf.eval.judge.matches import Setup, pair_matches, single_matches

FASTCHAT = Path(__file__).resolve().parents[4].parent / "shared" / "data" / "fastchat"
BRANCH = FASTCHAT / "skycamp_branch_14293b04" / "skycamp"
JUDGE_PROMPTS = FASTCHAT / "llm_judge" / "data" / "judge_prompts.jsonl"


def recorded(name: str) -> list[dict]:
    path = BRANCH / "model_judgment" / name
    assert path.exists(), f"{path} is missing: ../shared/data must sit beside the repository"
    return [json.loads(line) for line in path.read_text().splitlines()]


def setup_for(question_file: Path, answer_files: dict[str, Path], references: Path | None = None) -> Setup:
    questions = read_questions(question_file)
    answers = {model: read_answers(path, questions).turns for model, path in answer_files.items()}
    refs = read_answers(references, questions).turns if references else {}
    return Setup(questions, answers, refs, read_judge_prompts(JUDGE_PROMPTS), "gpt-4", 0.0, 2048)


def replies(judgments: list[str]) -> list[Answered]:
    return [Answered(str(i), text, 0, 0, 0, 0.0) for i, text in enumerate(judgments)]


@pytest.fixture(scope="module")
def single_setup():
    # Questions 3 and 5 were `math` then: graded with single-math-v1 against the references.
    return setup_for(FASTCHAT / "skycamp_42cab2b0" / "skycamp" / "question.jsonl",
                     {"gpt-3.5-turbo": BRANCH / "model_answer" / "gpt-3.5-turbo.jsonl"},
                     BRANCH / "reference_answer" / "gpt-4.jsonl")


@pytest.fixture(scope="module")
def pair_setup():
    earlier = FASTCHAT / "skycamp_ea061f6d" / "skycamp"
    return setup_for(earlier / "question.jsonl", {"gpt-3.5-turbo": earlier / "model_answer" / "gpt-3.5-turbo.jsonl",
                                                  "gpt-4": BRANCH / "model_answer" / "gpt-4.jsonl"})


def test_every_recorded_single_prompt_is_rendered_byte_for_byte(single_setup):
    built = single_matches(single_setup, ["gpt-3.5-turbo"])
    matches = {(m.question.question_id, m.models[0], m.turn): m for m in built}
    records = recorded("gpt-4_single.jsonl")
    assert len(records) == len(matches) == 5
    for record in records:
        match = matches[(record["question_id"], record["model"], record["turn"])]
        assert list(match.judge) == record["judge"]
        assert match.user_prompts[0] == record["user_prompt"]
        # What FastChat sends an OpenAI judge: the prompt's system message, then the prompt.
        assert match.requests[0].messages == [{"role": "system", "content": "You are a helpful assistant."},
                                              {"role": "user", "content": record["user_prompt"]}]
    assert {r["question_id"] for r in records if r["judge"][1] == "single-math-v1"} == {3, 5}


def test_every_recorded_single_judgment_parses_to_the_recorded_score(single_setup):
    matches = {(m.question.question_id, m.turn): m for m in single_matches(single_setup, ["gpt-3.5-turbo"])}
    for record in recorded("gpt-4_single.jsonl"):
        ours = matches[(record["question_id"], record["turn"])].records(replies([record["judgment"]]))[0]
        assert ours["score"] == record["score"] and type(ours["score"]) is type(record["score"])
        assert {k: ours[k] for k in record if k != "tstamp"} == {k: record[k] for k in record if k != "tstamp"}


def test_both_orders_of_every_recorded_pair_are_rendered_byte_for_byte(pair_setup):
    matches = {m.question.question_id: m for m in pair_matches(pair_setup, ["gpt-3.5-turbo", "gpt-4"], "gpt-4")}
    records = recorded("gpt-4_pair.jsonl")
    assert len(records) == len(matches) == 5
    for record in records:
        match = matches[record["question_id"]]
        assert match.models == (record["model_1"], record["model_2"])
        assert match.user_prompts == (record["g1_user_prompt"], record["g2_user_prompt"])
        assert match.requests[0].messages[0]["content"].startswith("Please act as an impartial judge")
        assert [r.messages[1]["content"] for r in match.requests] == list(match.user_prompts)


def test_every_recorded_pair_judgment_parses_to_the_recorded_winners(pair_setup):
    matches = {m.question.question_id: m for m in pair_matches(pair_setup, ["gpt-3.5-turbo", "gpt-4"], "")}
    records = recorded("gpt-4_pair.jsonl")
    for record in records:
        ours = matches[record["question_id"]].records(replies([record["g1_judgment"], record["g2_judgment"]]))[0]
        assert {k: ours[k] for k in record if k != "tstamp"} == {k: record[k] for k in record if k != "tstamp"}
    # The recorded set holds consistent games and one whose verdict flips with the order.
    assert {(r["g1_winner"], r["g2_winner"]) for r in records} == {("model_2", "model_2"), ("model_1", "model_1"),
                                                                   ("model_1", "tie")}
