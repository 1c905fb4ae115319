"""Open Assistant message trees (the oasst export tree format), shared by the SFT and preference readers.

Each JSONL line is a tree whose `prompt` is the root message; a message has `role`
(`prompter` | `assistant`), `text`, `replies`, and optionally `rank` (0 is best,
null when unranked), `deleted` and `review_result`. The hub's oasst1/oasst2 hold the
same messages as a flat table (one row per message, linked by `message_id` and
`parent_id`); `trees_from_messages` rebuilds the trees from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from os import PathLike
from typing import Any

from offline_rlhf.data.errors import Location
from offline_rlhf.data.records import Records, iter_json_objects, require_field, require_text
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import ASSISTANT, USER, Turn

Message = dict[str, Any]

ROLES = {"prompter": USER, "assistant": ASSISTANT}


def iter_trees(path: str | PathLike) -> Iterator[tuple[Location, Message]]:
    """Yield (location, root message) per tree."""
    for where, tree in iter_json_objects(path):
        yield where, require_field(tree, "prompt", dict, where)


def trees_from_messages(rows: Records, skips: Skips) -> Iterator[tuple[Location, Message]]:
    """(location of the root's row, root message) per tree of a flat message table, replies
    in row order. Each row is checked where it stands (its role, text and rank); a reply
    whose parent is not in the table (a split cut mid-tree) is unusable: skipped and counted."""
    roots, children, located = [], {}, []
    for where, row in rows:
        message_id = require_field(row, "message_id", str, where)
        parent = row.get("parent_id")
        if parent is not None and not isinstance(parent, str):
            raise where.error(f"expected 'parent_id' to be a message id or null (got {type(parent).__name__})")
        require_field(row, "text", str, where)  # a blank text is judged where the tree uses it, as in files
        role(row, where)
        rank(row, where)
        node = {**row, "replies": children.setdefault(message_id, [])}
        located.append((where, node, parent))
        if parent is None:
            roots.append((where, node))
    for where, node, parent in located:
        if parent is not None:
            if parent in children:
                children[parent].append(node)
            else:
                with skips.record():
                    raise where.unusable(f"expected parent {parent!r} in the same split", "reply without its parent")
    return iter(roots)


def role(message: Message, where: Location) -> str:
    value = require_field(message, "role", str, where)
    if value not in ROLES:
        raise where.error(f"expected 'role' to be one of {sorted(ROLES)} (got {value!r})")
    return ROLES[value]


def turn(message: Message, where: Location) -> Turn:
    return role(message, where), require_text(message, "text", where)


def turns(path: list[Message], where: Location) -> list[Turn]:
    return [turn(message, where) for message in path]


def replies(message: Message, where: Location) -> list[Message]:
    """The usable replies, in file order: deleted ones and ones that failed review are dropped."""
    children = message.get("replies", [])
    if not isinstance(children, list) or not all(isinstance(child, dict) for child in children):
        raise where.error("expected 'replies' to be a list of message objects")
    return [child for child in children if not child.get("deleted") and child.get("review_result") is not False]


def rank(message: Message, where: Location) -> int | None:
    value = message.get("rank")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise where.error(f"expected 'rank' to be an integer or null (got {value!r})")
    return value


def best_ranked_path(root: Message, where: Location) -> list[Message]:
    """From the root, repeatedly follow the best-ranked reply (lowest rank; the first
    reply when none is ranked; unranked replies come after ranked ones) to a leaf."""
    path = [root]
    while children := replies(path[-1], where):
        ranks = [rank(child, where) for child in children]
        best = min(range(len(children)), key=lambda i: (ranks[i] is None, ranks[i] or 0, i))
        path.append(children[best])
    return path


def ranked_assistant_replies(message: Message, where: Location) -> list[Message]:
    """The usable assistant replies that carry a rank, best (lowest rank) first."""
    ranked = [
        child
        for child in replies(message, where)
        if rank(child, where) is not None and turn(child, where)[0] == ASSISTANT
    ]
    return sorted(ranked, key=lambda child: rank(child, where))


def iter_conversations(root: Message, where: Location) -> Iterator[tuple[list[Turn], Message]]:
    """Every usable message with the turns from the root to it (inclusive), depth first.

    Every message is validated on the way, not only those a reader ends up using.
    """
    stack = [([turn(root, where)], root)]
    while stack:
        history, message = stack.pop()
        yield history, message
        stack.extend((history + [turn(child, where)], child) for child in reversed(replies(message, where)))
