"""Reading the judge's verdicts: a `[[rating]]` (with FastChat's fallback to `[rating]`),
a pairwise `[[A]]`/`[[B]]`/`[[C]]`, and the paper format's `Assistant X: score` lines.
An unreadable rating is -1 (FastChat's convention), an unreadable verdict "error"."""

from __future__ import annotations

import re
from collections.abc import Sequence

UNPARSED = -1
# FastChat's one-score patterns: the doubled brackets first, then single brackets.
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
# `Assistant B: 7`, also bolded (`**Assistant B**: 7.5`) as judges like to write it.
_PAPER_SCORE = re.compile(r"Assistant\s+([A-Z])\b\**\s*:\s*\**\s*(\d+(?:\.\d+)?)")
PAPER_RANGE = (1.0, 10.0)


def _number(text: str) -> int | float:
    """An int for `8`, a float for `8.5` or `8.`: the value FastChat's literal_eval gives."""
    return float(text) if "." in text else int(text)


def parse_rating(judgment: str) -> int | float:
    match = _RATING.search(judgment) or _RATING_FALLBACK.search(judgment)
    return _number(match.group(1)) if match else UNPARSED


def parse_verdict(judgment: str) -> str:
    """"A", "B", "tie" or "error", checked in FastChat's order (A first)."""
    for mark, verdict in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if mark in judgment:
            return verdict
    return "error"


def parse_paper_scores(judgment: str, letters: Sequence[str]) -> dict[str, int | float]:
    """Each assistant's score: its last `Assistant X: score` (the scores come after the
    explanations, which may name assistants too); -1 where none, or outside 1..10."""
    found: dict[str, int | float] = {}
    for letter, value in _PAPER_SCORE.findall(judgment):
        found[letter] = _number(value)
    low, high = PAPER_RANGE
    return {letter: found[letter] if low <= found.get(letter, UNPARSED) <= high else UNPARSED for letter in letters}
