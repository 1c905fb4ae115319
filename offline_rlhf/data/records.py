"""Reading records with their locations: the one loop every reader builds on.

Readers never open files themselves; they iterate `iter_json_objects` or
`iter_tsv_rows`, so UTF-8 errors, broken JSON and empty files are reported the
same way everywhere, as a DataError naming the file and 1-based line.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from os import PathLike
from typing import Any, TypeVar

from offline_rlhf.data.errors import DataError, Location
from offline_rlhf.data.template import ASSISTANT, SYSTEM, USER, ChatTemplate, Turn, check_alternation

T = TypeVar("T")
Records = Iterable[tuple[Location, dict[str, Any]]]  # what readers loop over: a file's lines or a dataset's rows
_MESSAGE_ROLES = {"user": USER, "assistant": ASSISTANT}
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = "\ufeff"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def iter_lines(path: str | PathLike) -> Iterator[tuple[Location, str]]:
    """Yield (location, text) for every non-blank line, without its line ending (LF or CRLF)
    or a leading UTF-8 byte-order mark; raise DataError if there is none."""
    found = False
    # Binary lines split on b"\n" only: str.splitlines would also split on U+2028,
    # which JSON strings may hold unescaped.
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(path, None, f"expected a readable file ({err.strerror}; relative paths start from the current "
                                    "directory)") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = Location(str(path), number)
            text = _decode(raw, where).rstrip("\r\n")
            if number == 1:  # as utf-8-sig reads it: the byte-order mark Windows editors write is no text
                text = text.removeprefix(_BOM)
            if text.strip():
                found = True
                yield where, text
    if not found:
        raise DataError(path, None, "expected at least one record (no records)")


def _decode(raw: bytes, where: Location) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if where.record == 1 and raw.startswith(_UTF16_BOMS):
            raise where.error("expected UTF-8 text (the file starts with a UTF-16 byte-order mark: it looks like "
                              "UTF-16; save it as UTF-8)") from None
        raise where.error(
            f"expected UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)"
        ) from None


class _RepeatedKey(Exception):
    """Raised by `_unique_keys` inside json.loads, turned into a DataError naming the line."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook, for every object at every level: a repeated key is an error
    (json.loads would silently keep the last value: `{"response": "a", "response": "b"}`)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        raise _RepeatedKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return record


# One decoder: json.loads with a keyword builds a new one per call (+80% on a 100k-line file).
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def parse_json_line(text: str, where: Location) -> Any:
    """One line's JSON value; anything json cannot read is a DataError at `where`: broken
    JSON, a repeated key in any object, an integer longer than Python converts (4300 digits
    by default) or nesting deeper than its recursion limit (about 1000 levels)."""
    try:
        if text.startswith(_BOM):  # as json.loads says it (its check; the decoder has none)
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        # UTF-16 without a byte-order mark decodes as UTF-8 (ASCII with a NUL byte after each character).
        utf16 = " (a third or more of the line is NUL bytes: it looks like UTF-16; save it as UTF-8)" \
            if text.count("\x00") * 3 >= len(text) else ""
        raise where.error(f"expected a JSON object (invalid JSON: {exc.msg}, column {exc.colno}){utf16}") from None
    except _RepeatedKey as exc:
        raise where.error(f"expected a JSON object whose keys are unique (key {exc.args[0]!r} appears more than "
                          "once; json would keep only its last value)") from None
    except RecursionError:
        raise where.error(f"expected a JSON object nested less than about {sys.getrecursionlimit()} levels deep "
                          "(this line nests deeper than Python's json reader can read)") from None
    except ValueError as exc:  # json's own errors are JSONDecodeErrors: this is int() refusing a huge literal
        digits = sys.get_int_max_str_digits()
        what = f"an integer literal has more than {digits} digits" if "digits" in str(exc) else str(exc)
        raise where.error(f"expected a JSON object with numbers Python can read ({what})") from None


def iter_json_objects(path: str | PathLike) -> Iterator[tuple[Location, dict[str, Any]]]:
    """Yield (location, object) for every line of a JSONL file; each line must be a JSON object."""
    for where, text in iter_lines(path):
        record = parse_json_line(text, where)
        if not isinstance(record, dict):
            raise where.error(f"expected a JSON object (got {type(record).__name__})")
        if "\\u" in text:  # only a \uXXXX escape can make a lone surrogate; raw UTF-8 cannot
            _check_surrogates(record, where)
        yield where, record


def _check_surrogates(value: Any, where: Location) -> None:
    """A lone surrogate (`"\\ud800"`) is valid JSON but not text: UTF-8 encoding fails later.
    A stack, not recursion: a record may be nested nearly as deep as json reads."""
    stack = [value]
    while stack:
        value = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            if isinstance(item, str) and (lone := _SURROGATE.search(item)):
                raise where.error(f"expected valid Unicode text in {key!r} (a lone surrogate escape "
                                  f"\\u{ord(lone.group()):04x})")
            if isinstance(item, (dict, list)):
                stack.append(item)


def iter_tsv_rows(path: str | PathLike, columns: Sequence[str]) -> Iterator[tuple[Location, dict[str, str]]]:
    """Yield (location, {column: field}) for a header-less TSV with exactly `columns` fields per line.

    Fields are split on tabs only, with no CSV quoting: these files hold literal quotes.
    """
    for where, text in iter_lines(path):
        fields = text.split("\t")
        if len(fields) != len(columns):
            raise where.error(
                f"expected {len(columns)} tab-separated fields ({', '.join(columns)}), got {len(fields)}"
            )
        yield where, dict(zip(columns, fields))


def require_field(record: Mapping[str, Any], key: str, kind: type[T], where: Location) -> T:
    """record[key], which must exist and be of type `kind`."""
    if key not in record:
        raise where.error(f"expected an object with key {key!r} (missing)")
    value = record[key]
    if not isinstance(value, kind):
        raise where.error(f"expected {key!r} to be {kind.__name__} (got {type(value).__name__})")
    return value


def require_number(record: Mapping[str, Any], key: str, where: Location) -> float:
    """record[key] as a float; it must be a finite JSON number (not a bool, not a string).
    Python's json reads NaN and Infinity, which no JSON number is: a NaN reward would
    pass every `>` filter as False and train on `<rm_score> nan`."""
    if key not in record:
        raise where.error(f"expected an object with key {key!r} (missing)")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(f"expected {key!r} to be a number (got {type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:  # an integer literal beyond the float range, e.g. 1 followed by 400 zeros
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise where.error(f"expected {key!r} to be a finite number (got {number})")
    return number


def require_text(record: Mapping[str, Any], key: str, where: Location, *, allow_empty: bool = False) -> str:
    """record[key] as stripped text; it must be a string and, unless allow_empty, not blank
    (blank raises UnusableRecord, which dataset builders count instead of failing on)."""
    text = require_field(record, key, str, where).strip()
    if not text and not allow_empty:
        # Well-formed but unusable: a dataset builder skips and counts it (data.skips).
        raise where.unusable(f"expected {key!r} to be non-empty text (blank)", f"blank {key!r}")
    return text


def require_messages(record: Mapping[str, Any], key: str, where: Location) -> list[Turn]:
    """record[key], a chat-format list of `{role, content}` messages, as turns; a leading
    system message is a system turn (a chat template renders it as one, the paper's format
    folds it into the first user turn). Roles other than system/user/assistant (tools)
    and blank messages make the record unusable; a list of anything else is malformed."""
    messages = require_field(record, key, list, where)
    if not messages or not all(isinstance(message, dict) for message in messages):
        raise where.error(f"expected {key!r} to be a non-empty list of {{role, content}} objects")
    roles = [require_field(message, "role", str, where) for message in messages]
    texts = [require_text(message, "content", where, allow_empty=True) for message in messages]
    unknown = sorted(set(roles[1:] if roles[0] == SYSTEM else roles) - set(_MESSAGE_ROLES))
    if unknown:
        raise where.unusable(f"expected {key!r} roles to be user/assistant after an optional leading system "
                             f"message (got {unknown})", f"{key!r} with other roles")
    if any(not text for text in texts):
        raise where.unusable(f"expected every message of {key!r} to have content (blank)", f"blank {key!r} message")
    system = [(SYSTEM, texts[0])] if roles[0] == SYSTEM else []
    return system + [(_MESSAGE_ROLES[role], text) for role, text in zip(roles, texts) if role != SYSTEM]


def conversation(history: Sequence[Turn]) -> tuple[Turn, ...]:
    """What an example keeps of its history for a chat template: the turns when there is
    more than the one user turn (which the prompt itself already is: a system turn and a user
    turn are more), else nothing."""
    return tuple(history) if len(history) > 1 else ()


# a record's multi-turn prompt: [[role, text], ...], user/assistant alternating from user to user after an
# optional system turn
TURNS = "turns"


def optional_turns(record: Mapping[str, Any], where: Location) -> tuple[Turn, ...]:
    """record["turns"] as turns, or () when absent: the conversation a chat template renders
    for a multi-turn prompt (`prompt` holds it folded). Anything but a list of [role, text]
    pairs that alternate user/assistant from user to user, after an optional system turn,
    is malformed; a blank text makes the record unusable (as a blank `prompt` does)."""
    if TURNS not in record:
        return ()
    value = record[TURNS]
    expected = f"expected {TURNS!r} to be a list of [role, text] pairs, roles user/assistant alternating from user " \
               "to a last user turn after an optional system turn"
    if not isinstance(value, list) or not all(isinstance(turn, list) and len(turn) == 2 and
                                              all(isinstance(part, str) for part in turn) for turn in value):
        raise where.error(expected)
    turns = tuple((role, text) for role, text in value)
    try:  # the roles alone (placeholder texts): a blank text is unusable, not malformed
        check_alternation([(role, "-") for role, _ in turns])
    except ValueError as exc:
        raise where.error(f"{expected} ({exc})") from None
    if blank := [index for index, (_, text) in enumerate(turns, start=1) if not text.strip()]:
        raise where.unusable(f"expected every turn of {TURNS!r} to have text (turn {blank[0]} is blank)",
                             f"blank {TURNS!r} turn")
    return turns


def record_turns(record: Mapping[str, Any], where: Location) -> tuple[Turn, ...]:
    """The turns of a record in a generic file of prompts, SFT or preference data (JSONL, or
    a dataset's row): `optional_turns`, where one user turn alone is no conversation (()). A null
    (a dataset row without them) gives () too, and so does a FastChat question file's
    `turns`, a list of strings (questions asked one after another, read through
    prompt_key=turns), not [role, text] pairs."""
    value = record.get(TURNS)
    if value is None or isinstance(value, list) and all(isinstance(turn, str) for turn in value):
        return ()
    return conversation(optional_turns(record, where))


def turns_field(turns: Sequence[Turn]) -> dict[str, list[list[str]]]:
    """What a written record holds of a prompt's turns: nothing for one user turn alone."""
    return {TURNS: [list(turn) for turn in turns]} if turns else {}


def fold_at(template: ChatTemplate, turns: Sequence[Turn], where: Location) -> str:
    """template.fold_history(turns), reporting a bad conversation as a DataError at `where`."""
    try:
        return template.fold_history(turns)
    except ValueError as exc:
        raise where.error(f"expected a user/assistant conversation: {exc}") from None


def select_reader(readers: Mapping[str, Callable[..., T]], format: str) -> Callable[..., T]:
    """readers[format], or a ValueError listing the known formats."""
    if format not in readers:
        raise ValueError(f"unknown data format {format!r}; expected one of {sorted(readers)}")
    return readers[format]
