"""What the judge is asked: FastChat's MT-bench prompts rendered exactly as FastChat's
llm_judge renders them (`str.format` of the template with the question, answer and
reference turns), and the paper's Appendix A prompt, which shows every model's answer to a
question at once under anonymous names in a seeded per-question order."""

from __future__ import annotations

import random
from collections.abc import Sequence

from offline_rlhf.eval.judge.inputs import JudgePrompt, Question, QuestionId

# FastChat grades these categories against a reference answer (its NEED_REF_CATS).
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
PAPER_PROMPT_NAME = "paper-appendix-a"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def needs_reference(question: Question) -> bool:
    return question.category in REFERENCE_CATEGORIES


def judge_prompt_name(kind: str, question: Question, turn: int) -> str:
    """FastChat's choice of prompt: `single-v1` / `pair-v2`, their `-math-v1` versions for
    reference-graded categories, and `-multi-turn` variants for the second turn."""
    general, math = {"single": ("single-v1", "single-math-v1"), "pairwise": ("pair-v2", "pair-math-v1")}[kind]
    name = math if needs_reference(question) else general
    return name + ("-multi-turn" if turn == 2 else "")


def _reference_fields(reference: Sequence[str] | None) -> dict[str, str]:
    turns = reference or ()
    return {f"ref_answer_{i + 1}": text for i, text in enumerate(turns[:2])}


def render_single(prompt: JudgePrompt, question: Question, answer: Sequence[str], turn: int,
                  reference: Sequence[str] | None = None) -> str:
    """The user message of a single-answer grading (turn 2 shows the whole conversation)."""
    if turn == 2:
        fields = {"question_1": question.turns[0], "question_2": question.turns[1],
                  "answer_1": answer[0], "answer_2": answer[1]}
    else:
        fields = {"question": question.turns[0], "answer": answer[0]}
    return prompt.prompt_template.format(**fields, **_reference_fields(reference))


def render_pair(prompt: JudgePrompt, question: Question, answer_a: Sequence[str], answer_b: Sequence[str],
                turn: int, reference: Sequence[str] | None = None) -> str:
    """The user message of a pairwise comparison with `answer_a` shown as Assistant A."""
    if turn == 2:
        fields = {"question_1": question.turns[0], "question_2": question.turns[1],
                  "answer_a_1": answer_a[0], "answer_b_1": answer_b[0],
                  "answer_a_2": answer_a[1], "answer_b_2": answer_b[1]}
    else:
        fields = {"question": question.turns[0], "answer_a": answer_a[0], "answer_b": answer_b[0]}
    return prompt.prompt_template.format(**fields, **_reference_fields(reference))


def messages(system_prompt: str, user_prompt: str) -> list[dict[str, str]]:
    """The chat messages FastChat sends an OpenAI judge: its system prompt, then the prompt."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": user_prompt}]


def paper_order(models: Sequence[str], question_id: QuestionId, seed: int) -> list[str]:
    """The models in the order the paper prompt shows them for this question: a shuffle
    seeded by (seed, question id), the same in every process (string seeds are hashed with
    SHA-512, not Python's salted hash), so a rerun and a resume show the same order."""
    order = list(models)
    random.Random(f"{seed}:{question_id!r}").shuffle(order)
    return order


def _count(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _listing(letters: Sequence[str]) -> str:
    return letters[0] if len(letters) == 1 else f"{', '.join(letters[:-1])} and {letters[-1]}"


def render_paper(question_text: str, answers: Sequence[str]) -> str:
    """The paper's Appendix A prompt for answers shown in this order as Assistant A, B, ...
    (the paper wrote five and its model names; here the count follows the answers and the
    names are letters, so the judge cannot favour a method by name)."""
    letters = LETTERS[:len(answers)]
    n = _count(len(answers))
    head = (
        f"Please act as an impartial judge and evaluate the quality of the responses provided by {n} AI assistants "
        "to the user question. You should choose the assistant that follows the user’s instructions and answers "
        "the user’s questions better. Your evaluation should consider factors such as the helpfulness, relevance, "
        "and level of detail of their responses.\n\n"
        f"Begin your evaluation by comparing the {n} responses and provide a short explanation. Avoid any position "
        "biases and ensure that the order in which the responses were presented does not influence your decision. "
        "Do not allow the length of the responses to influence your evaluation. Do not favor certain names of the "
        "assistants. Be as objective as possible. After providing your explanation, output your final verdict by "
        "strictly following this format:\n\n"
        "{Assistant name}: {score}, where the range of {score} is 1 to 10.\n\n"
        "The answers can have the same score, but you should distinguish them as much as possible. You should give "
        "the assistant’s scores one by one after all the explanations. The followings are the question and answers "
        f"of Assistant {_listing(letters)},\n\n"
        f"User Question:\n{question_text}"
    )
    shown = zip(letters, answers)
    return head + "".join(f"\n\nThe answer of Assistant {letter}:\n{answer}" for letter, answer in shown)
