"""Reading the judge's verdicts: a `[[rating]]` (with FastChat's fallback to `[rating]`),
a pairwise `[[A]]`/`[[B]]`/`[[C]]`, and the paper format's `Assistant X: score` lines.
An unreadable rating is -1 (FastChat's convention), an unreadable verdict "error". Both
score prompts ask for 1 to 10: a score outside that range (`[[1000000]]`, or hundreds of
digits no float holds) is unreadable too, never a value a mean would take."""

from __future__ import annotations

import re
from collections.abc import Sequence

UNPARSED = -1
# FastChat's one-score patterns: the doubled brackets first, then single brackets.
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
# `Assistant B: 7`, also bolded (`**Assistant B**: 7.5`) as judges like to write it.
_PAPER_SCORE = re.compile(r"Assistant\s+([A-Z])\b\**\s*:\s*\**\s*(\d+(?:\.\d+)?)")
SCORE_RANGE = (1.0, 10.0)  # what FastChat's single-v1 and the paper's Appendix A prompts ask for
MAX_SCORE_CHARS = 32  # longer number text is no score (and int() refuses 4300 digits and more)


def _score(text: str) -> int | float:
    """An int for `8`, a float for `8.5` or `8.` (the value FastChat's literal_eval gives);
    UNPARSED outside SCORE_RANGE."""
    if len(text) > MAX_SCORE_CHARS:
        return UNPARSED
    value = float(text) if "." in text else int(text)
    low, high = SCORE_RANGE
    return value if low <= value <= high else UNPARSED


def parse_rating(judgment: str) -> int | float:
    """The first `[[rating]]` (else the first `[rating]`), as FastChat reads it, or UNPARSED."""
    match = _RATING.search(judgment) or _RATING_FALLBACK.search(judgment)
    return _score(match.group(1)) if match else UNPARSED


def parse_verdict(judgment: str) -> str:
    """"A", "B", "tie" or "error", checked in FastChat's order (A first)."""
    for mark, verdict in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if mark in judgment:
            return verdict
    return "error"


def parse_paper_scores(judgment: str, letters: Sequence[str]) -> dict[str, int | float]:
    """Each assistant's score: its last `Assistant X: score` (the scores come after the
    explanations, which may name assistants too); -1 where none, or outside 1..10."""
    found = {letter: _score(value) for letter, value in _PAPER_SCORE.findall(judgment)}  # the last one counts
    return {letter: found.get(letter, UNPARSED) for letter in letters}
