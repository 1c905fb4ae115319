"""The paper's prompt format, `User: {instruction} Assistant: {response}` (arXiv 2308.12050, Sec. 4)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

USER = "user"
ASSISTANT = "assistant"
SYSTEM = "system"

Turn = tuple[str, str]  # (USER | ASSISTANT, text); SYSTEM only as a conversation's first turn
REWARD_TAG = "<rm_score>"


@dataclass(frozen=True)
class ChatTemplate:
    """Renders `{user_tag}{sep}{instruction}{sep}{assistant_tag}{sep}{response}`.

    Every text is stripped of surrounding whitespace before it is placed, so the
    separators are the only whitespace the template itself adds.
    """

    user_tag: str = "User:"
    assistant_tag: str = "Assistant:"
    sep: str = " "

    def __post_init__(self):
        if not self.user_tag.strip() or not self.assistant_tag.strip():
            raise ValueError(f"expected non-empty tags, got {self.user_tag!r} and {self.assistant_tag!r}")

    def fold_history(self, turns: Sequence[Turn]) -> str:
        """The instruction string that makes `prompt_text` render the whole conversation.

        Turns must alternate user/assistant, start and end with a user turn, and be
        non-empty: (u1, a1, u2) folds to `u1 Assistant: a1 User: u2`. A leading system
        turn s has no place in this format: it goes before u1, a blank line apart (`s\n\nu1`).
        """
        check_alternation(turns)
        tags = {USER: self.user_tag, ASSISTANT: self.assistant_tag}
        first, *rest = fold_system(turns)
        return self.sep.join([first[1].strip()] + [f"{tags[role]}{self.sep}{text.strip()}" for role, text in rest])

    def prompt_text(self, instruction: str) -> str:
        """`User: {instruction} Assistant:`; no trailing separator, `response_text` adds it."""
        return f"{self.user_tag}{self.sep}{instruction.strip()}{self.sep}{self.assistant_tag}"

    def response_text(self, response: str) -> str:
        """What follows the prompt; EOS is the tokenizer stage's job."""
        return f"{self.sep}{response.strip()}"

    def reward_prompt(self, score: float) -> str:
        """Decision-Transformer alignment's reward prompt R*(p, x) (paper Eq. 6), placed
        right after the assistant tag: `User: {instruction} Assistant: <rm_score> a.b {response}`,
        the score with one decimal. The ONE function used to build both training samples
        and inference prompts, so their tokens cannot drift apart."""
        return f"{self.sep}{REWARD_TAG}{self.sep}{reward_text(score)}"


def split_system(turns: Sequence[Turn]) -> tuple[str, Sequence[Turn]]:
    """(the text of a leading system turn, or "", the turns after it)."""
    if turns and turns[0][0] == SYSTEM:
        return turns[0][1], turns[1:]
    return "", turns


def fold_system(turns: Sequence[Turn]) -> Sequence[Turn]:
    """`turns` with a leading system turn's text moved into the first user turn, a blank line
    apart: how a format without system messages shows one."""
    system, rest = split_system(turns)
    if not system or not rest:
        return turns
    (role, text), *later = rest
    return [(role, f"{system.strip()}\n\n{text.strip()}"), *later]


def check_alternation(turns: Sequence[Turn]) -> None:
    """Raise ValueError unless turns go user, assistant, user, ..., user, all with text,
    after an optional system turn (with text) first."""
    system, conversation = split_system(turns)
    offset = len(turns) - len(conversation)
    if offset and not system.strip():
        raise ValueError("expected turn 1 (system) to have text (empty)")
    if not conversation:
        raise ValueError("expected at least one user turn")
    for index, (role, text) in enumerate(conversation):
        expected_role = USER if index % 2 == 0 else ASSISTANT
        if role != expected_role:
            raise ValueError(
                f"expected turn {index + offset + 1} to be {expected_role!r}, got {role!r} "
                "(turns alternate user/assistant, starting with user, after an optional system turn)"
            )
        if not text.strip():
            raise ValueError(f"expected turn {index + offset + 1} to have text (empty)")
    if conversation[-1][0] != USER:
        raise ValueError("expected the last turn to be a user turn, got 'assistant'")


def reward_text(score: float) -> str:
    """A DT reward with one decimal; a score that rounds to zero is "0.0" whatever its sign
    (Python writes -0.04 as "-0.0": one reward, two spellings for the model to learn)."""
    return f"{round(score, 1) + 0.0:.1f}"
