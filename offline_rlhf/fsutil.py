"""Small file-system helpers shared by checkpoints, ledgers and stage outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


def write_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary sibling, fsync, then rename: readers see the old or the new
    content, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl_durably(path: str | Path, rows: Iterable[dict]) -> None:
    """Append `rows` as JSON lines in one write, flushed and fsynced: they land together,
    and a crash tears at most the last line (which a reader must be ready to cut)."""
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
        handle.flush()
        os.fsync(handle.fileno())
