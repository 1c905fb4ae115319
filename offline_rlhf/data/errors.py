"""The one exception every dataset reader raises for malformed input."""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike


class DataError(ValueError):
    """A malformed data source.

    The message reads `{source}:{record}: {expected}`, e.g.
    `data.jsonl:17: expected an object with key 'response' (missing)`; `record` is
    the 1-based line (or row) number, or None for a problem with the whole file.
    """

    def __init__(self, source: str | PathLike, record: int | None, expected: str):
        self.source = str(source)
        self.record = record
        self.expected = expected
        where = self.source if record is None else f"{self.source}:{record}"
        super().__init__(f"{where}: {expected}")

    def __reduce__(self):
        # DataLoader workers pickle exceptions; rebuild from our three fields, not from args.
        return type(self), (self.source, self.record, self.expected)


class UnusableRecord(DataError):
    """A well-formed record that cannot be used (identical replies, a blank response).

    Dataset builders skip and count these by `reason` (see `data.skips.Skips`); only
    `strict` turns them back into errors. Malformed records stay plain DataErrors.
    """

    def __init__(self, source: str | PathLike, record: int | None, expected: str, reason: str = "unusable"):
        super().__init__(source, record, expected)
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.source, self.record, self.expected, self.reason)


@dataclass(frozen=True)
class Location:
    """Where a record came from: a file (or dataset name) and its 1-based record number."""

    source: str
    record: int

    def error(self, expected: str) -> DataError:
        return DataError(self.source, self.record, expected)

    def unusable(self, expected: str, reason: str) -> UnusableRecord:
        return UnusableRecord(self.source, self.record, expected, reason)
