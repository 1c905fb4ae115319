"""Counting unusable records instead of failing a whole job on one of them (no torch here).

Real and generated data hold a few well-formed but unusable records (identical chosen
and rejected replies, a blank response, a generation cut at max_new_tokens). A reader
raises `UnusableRecord` for them; `Skips.record()` around one record's work counts it
by reason, or re-raises it when `strict` (the `data.strict` / `strict` config keys).
Malformed records (bad JSON, wrong types, missing keys) are never caught here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from offline_rlhf.data.errors import Location, UnusableRecord
from offline_rlhf.data.records import require_text


@dataclass
class Skips:
    strict: bool = False
    counts: dict[str, int] = field(default_factory=dict)  # reason -> records skipped

    @contextmanager
    def record(self) -> Iterator[None]:
        """Run one record's work; an UnusableRecord raised in it is counted (or re-raised when strict)."""
        try:
            yield
        except UnusableRecord as err:
            if self.strict:
                raise
            self.add(err.reason)

    def add(self, reason: str, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def strict_or(skips: Skips | None) -> Skips:
    """A reader's `skips` argument: None keeps the old contract, every unusable record an error."""
    return Skips(strict=True) if skips is None else skips


def require_texts(record: Mapping[str, Any], keys: Sequence[str], where: Location) -> list[str]:
    """record[key] as stripped non-blank text for each key. Every key is type-checked before
    a blank one is reported, so a malformed record stays an error even beside a blank field."""
    texts = [require_text(record, key, where, allow_empty=True) for key in keys]
    for key, text in zip(keys, texts):
        if not text:
            require_text(record, key, where)  # raises the UnusableRecord for the blank field
    return texts


def describe(counts: dict[str, int]) -> str:
    """`3 skipped (2 identical chosen and rejected, 1 blank 'response')`, or `0 skipped`."""
    total = sum(counts.values())
    detail = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()) if n)
    return f"{total} skipped ({detail})" if total else "0 skipped"
