"""Small file-system helpers shared by checkpoints, ledgers and stage outputs."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A temporary sibling of `path` to write, fsynced and renamed over it when the block
    ends: readers see the old or the new content, never a torn file. Content can be
    written as it is made, not held whole. A block that fails removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """`rows` as JSON lines, atomically, each written as it comes (a million rows of
    reference pairs joined into one string were gigabytes)."""
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def append_jsonl_durably(path: str | Path, rows: Iterable[dict]) -> None:
    """Append `rows` as JSON lines in one write, flushed and fsynced: they land together,
    and a crash tears at most the last line (which a reader must be ready to cut)."""
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
        handle.flush()
        os.fsync(handle.fileno())
