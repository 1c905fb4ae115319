"""Verdict parsing (FastChat's rating fallback, pairwise marks, the paper's per-assistant
scores), the paper format's seeded anonymization and its undoing, and the paper's ranking
normalization."""

from __future__ import annotations

import pytest

from offline_rlhf.eval.judge.calls import Answered
from offline_rlhf.eval.judge.inputs import Question
from offline_rlhf.eval.judge.matches import Setup, paper_matches
from offline_rlhf.eval.judge.parsing import UNPARSED, parse_paper_scores, parse_rating, parse_verdict
from offline_rlhf.eval.judge.prompts import paper_order, render_paper
from offline_rlhf.eval.judge.ranking import rank_scores

MODELS = ["sft", "mle_filter", "rwr", "dt", "ppo"]


@pytest.mark.parametrize("judgment, score", [
    ("Fine answer.\n\nRating: [[7]]", 7),
    ("Rating: [[8.5]] and later [[3]]", 8.5),  # the first doubled rating
    ("Rating: [6] (single brackets, FastChat's fallback)", 6),
    ("see [2] but finally [[9]]", 9),  # doubled brackets win over an earlier single one
    ("Rating: 7/10", UNPARSED),
    ("Rating: [[seven]]", UNPARSED),
    ("Rating: [[10]]", 10),
    ("Rating: [[1.0]]", 1.0),
])
def test_rating_is_read_as_fastchat_reads_it(judgment, score):
    parsed = parse_rating(judgment)
    assert parsed == score and type(parsed) is type(score)


@pytest.mark.parametrize("rating", ["0", "10.5", "1000000", "9" * 400, "9" * 400 + ".5", "9" * 5000, "8." + "0" * 40])
def test_a_rating_off_the_1_to_10_scale_is_unreadable_not_a_score(rating):
    """A hostile or broken judge's number counts as an unreadable rating: it would become a
    model's mean (1000000), overflow it (400 digits), turn it into inf (a 400-digit float), or
    make int() refuse (past 4300 digits); the later [[8]] does not count, as FastChat reads
    only the first rating."""
    assert parse_rating(f"Rating: [[{rating}]], or rather [[8]]") == UNPARSED
    assert parse_rating(f"Rating: [{rating}]") == UNPARSED
    assert parse_paper_scores(f"Assistant A: {rating}\nAssistant B: 7", "AB") == {"A": UNPARSED, "B": 7}


@pytest.mark.parametrize("judgment, verdict", [
    ("Final verdict: [[A]]", "A"), ("[[B]]", "B"), ("Final verdict: [[C]] for a tie.", "tie"),
    ("[[B]] ... or rather [[A]]", "A"),  # FastChat checks A first
    ("Assistant A is better.", "error"),
])
def test_pairwise_verdicts(judgment, verdict):
    assert parse_verdict(judgment) == verdict


def test_paper_scores_take_the_last_line_per_assistant():
    judgment = ("1. **Assistant A**:\n\nClear. Better than Assistant B: 3 points of detail missing there.\n\n"
                "Scores:\n\nAssistant A: 8.5\n\n**Assistant B**: 6\n\nAssistant C: 11\n\nAssistant B: 7")
    assert parse_paper_scores(judgment, "ABCD") == {"A": 8.5, "B": 7, "C": UNPARSED, "D": UNPARSED}


def test_the_order_is_deterministic_per_seed_and_question():
    first = [paper_order(MODELS, qid, seed=3) for qid in range(20)]
    assert first == [paper_order(MODELS, qid, seed=3) for qid in range(20)]
    assert all(sorted(order) == sorted(MODELS) for order in first)
    assert len({tuple(order) for order in first}) > 5  # shuffled per question
    assert first != [paper_order(MODELS, qid, seed=4) for qid in range(20)]


def test_the_paper_prompt_anonymizes_and_scores_go_back_to_their_models():
    questions = [Question(qid, "generic", (f"Question {qid}?",)) for qid in range(6)]
    answers = {m: {q.question_id: (f"answer written by {m}",) for q in questions} for m in MODELS}
    setup = Setup(questions, answers, {}, {}, "judge-x", 0.0, 512)
    truth = {"sft": 5, "mle_filter": 6, "rwr": 4, "dt": 9, "ppo": 8}
    for match in paper_matches(setup, MODELS, seed=11):
        prompt = match.user_prompts[0]
        assert not any(f"Assistant {m}" in prompt for m in MODELS)  # names never shown
        assert "evaluate the quality of the responses provided by five AI assistants" in prompt
        assert "answers of Assistant A, B, C, D and E,\n\nUser Question:\n" in prompt
        # The judge's reply, written as a judge would: per shown letter, the true score.
        lines = []
        for letter in "ABCDE":
            shown = prompt.split(f"The answer of Assistant {letter}:\n")[1].split("\n\n")[0]
            lines.append(f"Assistant {letter}: {truth[shown.removeprefix('answer written by ')]}")
        records = match.records([Answered("k", "\n".join(lines), 0, 0, 0, 1.0)])
        assert {r["model"]: r["score"] for r in records} == truth
        assert {r["model"]: r["rank_score"] for r in records} == {"dt": 5, "ppo": 4, "mle_filter": 3, "sft": 2,
                                                                   "rwr": 1}
        assert [r["model"] for r in records] == list(match.models) == records[0]["order"]


def test_render_paper_lists_the_answers_in_the_order_given():
    prompt = render_paper("Q?", ["first", "second"])
    assert prompt.endswith("User Question:\nQ?\n\nThe answer of Assistant A:\nfirst\n\n"
                           "The answer of Assistant B:\nsecond")
    assert "by two AI assistants" in prompt and "of Assistant A and B," in prompt


def test_rank_normalization_is_n_plus_one_minus_rank_with_shared_ranks_for_ties():
    assert rank_scores({"a": 9, "b": 7, "c": 7, "d": 2, "e": 8}) == {"a": 5, "e": 4, "b": 2.5, "c": 2.5, "d": 1}
    assert rank_scores({"a": 6, "b": UNPARSED}) is None
