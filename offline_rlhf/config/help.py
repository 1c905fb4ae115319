"""`orlhf STAGE --help`: every key of a stage with its default and one-line description.

Descriptions are the config dataclasses' own field comments (a trailing `# ...` on the
field's line, else the comment lines right above it), so the listing cannot drift from the
code; defaults are the stage's composed YAML (`???`: no default, `""`: empty)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from functools import lru_cache

from offline_rlhf.config.base import settable_fields


@lru_cache(maxsize=None)
def _class_comments(cls: type) -> dict[str, str]:
    """{field: comment} for the annotated fields written in `cls`'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {}  # line number -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = comments.get(node.end_lineno) or _comment_above(node.lineno, lines, comments)
    return found


def _comment_above(line: int, lines: list[str], comments: dict[int, str]) -> str:
    """The block of whole-line comments ending right above `line`, joined."""
    block = []
    while line - 1 in comments and lines[line - 2].lstrip().startswith("#"):
        line -= 1
        block.insert(0, comments[line])
    return " ".join(block)


def field_comment(schema: type, name: str) -> str:
    for cls in schema.__mro__:
        if dataclasses.is_dataclass(cls) and name in cls.__dict__.get("__annotations__", {}):
            return _class_comments(cls).get(name, "")
    return ""


def key_rows(schema: type, values: dict | None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML would show it, description) for every settable key."""
    rows = []
    values = values if isinstance(values, dict) else {}
    for name, kind in settable_fields(schema).items():
        if dataclasses.is_dataclass(kind):
            rows += key_rows(kind, values.get(name), f"{prefix}{name}.")
        else:
            rows.append((f"{prefix}{name}", _show(values.get(name, "???")), field_comment(schema, name)))
    return rows


def _show(value) -> str:
    if value is None:
        return "null"
    if value == "":
        return '""'
    if isinstance(value, str) and value != value.strip():  # a separator such as " ": visible
        return repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_keys(rows: list[tuple[str, str, str]]) -> str:
    width = max(len(key) for key, _, _ in rows)
    value_width = min(max(len(value) for _, value, _ in rows), 40)
    return "\n".join(f"  {key:<{width}}  {value:<{value_width}}  {text}".rstrip() for key, value, text in rows)
