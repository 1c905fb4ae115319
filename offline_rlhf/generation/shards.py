"""Durable per-replica shards (generate's, reference's, eval's per model): each
data-parallel replica appends its answers to its own `shard_XXXXX.jsonl` with fsync, so a
crash loses at most the batch in flight and a rerun never answers a prompt twice; the
merge checks every prompt was answered once. Also which contiguous block of prompts each
replica takes."""

from __future__ import annotations

import json
import os
import time
from array import array
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch.distributed as dist

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.data.errors import DataError
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.progress import Progress
from offline_rlhf.runtime import Runtime, raise_everywhere
from offline_rlhf.stage_support import check_resumable

FINGERPRINT = "shards_config.json"
RESTART = "delete {stage_dir}/shard_*.jsonl and rerun the stage to do every item again"


Check = Callable[[Iterable[dict]], Iterator[dict]]  # passes records through, refuses them at their end


def resume_shards(rt: Runtime, fingerprint: dict, n: int, schema: int | None = None,
                  check: Check | None = None) -> set[int]:
    """The items (each with `n` records) done by an earlier run under the same config: rank
    0 claims the shards for `fingerprint` and reads each once, cutting what a crash tore
    (`kept_records`), refusing records of another `schema` and what the stage's `check`
    refuses (records of other inputs); every rank fails with its problem. The other ranks
    read no shard: rank 0 sends them the ids (a million records held by every process
    were gigabytes each)."""
    problem, done = None, None
    if rt.is_main:
        try:
            claim_shards(rt.stage_dir, fingerprint)
            records = _resumed_records(rt, n, schema)
            done = answered_prompts(records if check is None else check(records), n)
        except (ConfigError, DataError) as err:  # a changed config or inputs, a damaged shard
            problem = err
    raise_everywhere(problem, rt.device, "resume the shards")
    return _from_rank0(rt, done)


def _resumed_records(rt: Runtime, n: int, schema: int | None) -> Iterator[dict]:
    for path in shard_paths(rt.stage_dir):
        if (yield from kept_records(path, n, schema)):
            rt.log(f"cut a torn last line (and an incomplete item's records) from {path}")


def _from_rank0(rt: Runtime, done: set[int] | None) -> set[int]:
    """Rank 0's `done` on every rank, sent as 8 bytes an id."""
    if not dist.is_initialized() or dist.get_world_size(rt.wait_group) == 1:
        return done
    box = [array("q", sorted(done)) if rt.is_main else None]
    dist.broadcast_object_list(box, src=0, group=rt.wait_group)  # gloo where the stage has one: objects on the CPU
    return set(box[0])


def my_share(rt: Runtime, items: list) -> tuple[list, Path | None]:
    """This replica's contiguous block of `items` and the shard it appends to (None on TP
    ranks other than 0, which hold the same results)."""
    replica = rt.dp_rank
    writes = rt.mesh is None or rt.mesh.get_local_rank("tp") == 0
    shard = rt.stage_dir / f"shard_{replica:05d}.jsonl"
    return [items[i] for i in shard_indices(len(items), replica, rt.dims.dp)], shard if writes else None


class ShardTokens:
    """A running count of the records in every replica's shard and of their tokens
    (`tokens_of` a record), each shard read on from where the last count stopped, up to its
    last whole line (a replica may be writing). Rank 0 counts the other replicas' work with
    this: for the ledger's heartbeat (a killed run's row holds every replica's tokens) and
    for its progress bar (`show_shards`)."""

    def __init__(self, stage_dir: Path, tokens_of: Callable[[dict], int], from_now: bool = False):
        """`from_now`: count only what the shards gain from now (nothing of theirs is parsed)."""
        self.stage_dir, self.tokens_of, self.total, self.records = stage_dir, tokens_of, 0, 0
        self._read: dict[Path, int] = {}  # shard -> bytes counted
        if from_now:
            self._read = {path: _whole_lines_end(path) for path in shard_paths(stage_dir)}

    def count(self) -> int:
        """The tokens of every record so far (`records` counts them)."""
        for path in shard_paths(self.stage_dir):
            start = self._read.get(path, 0)
            with open(path, "rb") as handle:
                handle.seek(start)
                data = handle.read()
            whole = data[:data.rfind(b"\n") + 1]
            for line in whole.splitlines():
                try:
                    self.total += int(self.tokens_of(json.loads(line)))
                    self.records += 1
                except (ValueError, AttributeError, TypeError, KeyError, IndexError):  # not a record: the merge
                    pass  # says so, not the ledger
            self._read[path] = start + len(whole)
        return self.total


def new_records(rt: Runtime, tokens_of: Callable[[dict], int]) -> Callable[[], tuple[int, int]]:
    """Rank 0's count of the records the shards gained since now and of their tokens (this
    execution's, every replica's)."""
    tally = ShardTokens(rt.stage_dir, tokens_of, from_now=True)

    def since() -> tuple[int, int]:
        tokens = tally.count()
        return tally.records, tokens
    return since


def _whole_lines_end(path: Path, block: int = 1 << 16) -> int:
    """Where the last whole line of `path` ends (0: it has none), read back from its end."""
    with open(path, "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - block)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
    return 0


def show_shards(counted: Callable[[], tuple[int, int]], usage, bar: Progress, n: int = 1, before: int = 0) -> None:
    """Rank 0, while the replicas work: what every replica wrote since this execution began
    (`new_records`) into the ledger's heartbeat (a killed run's row then counts the tokens
    the shards kept, after the `before` of the execution's earlier work) and into `bar`,
    which started at the items done before (`n` records each): rank 0's progress covers the
    whole stage, not its own share. A bar at its end is not shown again."""
    records, tokens = counted()
    usage.tokens = before + tokens
    usage.beat(force=True)
    rate = tokens / max(time.monotonic() - bar.started, 1e-9)
    if (moved := bar.first + records // n - bar.done) or bar.done < bar.total:
        bar.update(moved, tok_s=f"{rate:.0f}")


def wait_for_replicas(rt: Runtime, show: Callable[[], None] | None) -> None:
    """The end-of-work barrier, without the process group's timeout (a replica may finish
    hours before the last); rank 0 `show`s the others' work meanwhile, and once all are
    done (the last poll may be seconds old)."""
    rt.barrier(poll=show)
    if show is not None:
        show()


def shard_indices(n_items: int, rank: int, world: int) -> range:
    """The contiguous block of item indices replica `rank` of `world` generates. Blocks are
    disjoint, cover 0..n_items-1 in order and differ in size by at most one (the first
    n_items % world replicas take one more), so concatenating the replicas' outputs in
    rank order restores the input order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    base, extra = divmod(n_items, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def shard_paths(stage_dir: Path) -> list[Path]:
    return sorted(stage_dir.glob("shard_*.jsonl"))


def claim_shards(stage_dir: Path, fingerprint: dict) -> None:
    """Shards of an earlier run are resumed only under the same config (same prompts,
    model and decoding); the first run records its config."""
    path = stage_dir / FINGERPRINT
    if shard_paths(stage_dir):
        check_resumable(json.loads(path.read_text()) if path.exists() else None, fingerprint, stage_dir)
    write_atomic(path, json.dumps(fingerprint, indent=2))


def kept_records(path: Path, n: int, schema: int | None = None) -> Iterator[dict]:
    """The records of shard `path` in one read, each item's `n` together, and at the end
    the cut of what a crash during a write left: a torn last line, then the records of an
    item that has fewer than its `n` (an item's records are appended together, so only the
    last can be incomplete; they are not yielded). Refuses any other damage
    (`_check_whole_items`) and, with `schema`, records of another version. Returns the bytes
    removed."""
    ids, item, start, end = [], [], 0, 0  # item: the last item's records so far, from byte `start`
    for number, offset, line in _lines(path):
        if not line.endswith(b"\n"):
            break  # torn
        record = _schema_record(path, number, line, schema)
        if item and record["id"] != item[0]["id"]:
            yield from item
            item, start = [], offset
        item.append(record)
        ids.append(record["id"])
        end = offset + len(line)  # of the whole lines
    if len(item) < n:
        del ids[len(ids) - len(item):]
        item, end = [], start
    _check_whole_items(path, ids, n)
    yield from item
    size = path.stat().st_size
    if end < size:
        with open(path, "r+b") as handle:
            handle.truncate(end)
    return size - end


def _check_whole_items(path: Path, ids: list[int], n: int) -> None:
    """Every item's `n` records, written together, are in the shard once: fewer or more
    means a hand edit or a copy, not a crash (found before any work, not at the merge)."""
    counts = Counter(ids)
    for number, item in enumerate(ids, start=1):
        if counts[item] != n:
            raise DataError(path, number, f"expected the {n} record(s) of item {item} together, once (found "
                            f"{counts[item]}: the shard was damaged other than by a crash mid-write); "
                            f"{RESTART.format(stage_dir=path.parent)}")


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(number, byte offset, line with its newline) of every line of shard `path`."""
    offset = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            yield number, offset, line
            offset += len(line)


def _schema_record(path: Path, number: int, line: bytes, schema: int | None) -> dict:
    """`shard_record`; with `schema`, it must carry it as its `schema`: records of another
    version (other fields, or fields that mean other things) would mix into one output with
    this version's, so a run they came from cannot be resumed."""
    record = shard_record(path, number, line)
    if schema is not None and record.get("schema") != schema:
        raise DataError(path, number, f"expected records of schema {schema}, this version's (got "
                        f"{record.get('schema')}: another version wrote them, and cannot be resumed); "
                        f"{RESTART.format(stage_dir=path.parent)}")
    return record


def shard_record(path: Path, number: int, line: str | bytes) -> dict:
    """Line `number` of shard `path` as its record. A crash tears only the last line
    (`kept_records` cuts it); anything else that is no record was damaged otherwise, and
    which answers it held is unknown."""
    try:
        text = (line.decode() if isinstance(line, bytes) else line).rstrip("\r\n")
        record = json.loads(text)
        usable = isinstance(record, dict) and isinstance(record.get("id"), int)
        problem = None if usable else f"got {text[:80]}"
    except UnicodeDecodeError:
        problem = "not UTF-8"
    except json.JSONDecodeError as exc:
        problem = f"invalid JSON: {exc.msg}, column {exc.colno}"
    if problem:
        raise DataError(path, number, f"expected a shard record with an integer 'id' ({problem}; the shard was "
                        f"damaged other than by a crash mid-write); {RESTART.format(stage_dir=path.parent)}")
    return record


def answered_prompts(records: Iterable[dict], n: int) -> set[int]:
    """Prompt ids with all n answers written."""
    counts = Counter(record["id"] for record in records)
    return {prompt_id for prompt_id, count in counts.items() if count >= n}


def merge_shards(stage_dir: Path, n_prompts: int, n: int = 1) -> Iterator[dict]:
    """All shard records ordered by (prompt id, sample), read as they are taken; checked
    first (`ShardIndex`)."""
    return (json.loads(line) for line in ShardIndex(stage_dir, n_prompts, n).lines())


class ShardIndex:
    """Where in the shards each (item, sample) record is: every answer exactly once, or a
    one-line error naming the stage folder and the way out. One read of every shard, which
    also shows each record to `each` (a stage's counts); `lines` then reads the records,
    as written, in (item, sample) order. Rank 0's merge held every record as a dict (a
    million records: 7.6 GB); this holds 16 bytes a record."""

    def __init__(self, stage_dir: Path, n_items: int, n: int = 1, each: Callable[[dict], None] | None = None):
        self.stage_dir, self.n_items, self.n, self.paths = stage_dir, n_items, n, shard_paths(stage_dir)
        self.shard, self.length = array("i", [-1]) * (n_items * n), array("i", [0]) * (n_items * n)
        self.offset = array("q", [0]) * (n_items * n)
        self.unexpected: set[tuple] = set()  # keys of no item of this run
        for shard, path in enumerate(self.paths):
            for number, offset, line in _lines(path):
                record = shard_record(path, number, line)
                self._place((record["id"], record.get("sample", 0)), shard, offset, len(line.rstrip(b"\n")))
                if each is not None:
                    each(record)
        self._check_all()

    def _place(self, key: tuple, shard: int, offset: int, length: int) -> None:
        item, sample = key
        expected = isinstance(sample, int) and 0 <= item < self.n_items and 0 <= sample < self.n
        at = item * self.n + sample if expected else None
        if (self.shard[at] >= 0) if expected else key in self.unexpected:
            raise ConfigError(str(self.stage_dir), f"prompt {item} (sample {sample}) was answered twice (two runs "
                              "wrote its shards at once?)", RESTART.format(stage_dir=self.stage_dir))
        if not expected:
            self.unexpected.add(key)
            return
        self.shard[at], self.offset[at], self.length[at] = shard, offset, length

    def _check_all(self) -> None:
        restart = RESTART.format(stage_dir=self.stage_dir)
        if self.unexpected:
            raise ConfigError(str(self.stage_dir), f"{len(self.unexpected)} answers are to no prompt of this run "
                              f"(first (prompt, sample) {sorted(self.unexpected)[:5]}, of {self.n_items} prompts "
                              f"with {self.n} answers each: the inputs changed since they were written)", restart)
        if missing := self.shard.count(-1):
            first = list(islice((divmod(at, self.n) for at, shard in enumerate(self.shard) if shard < 0), 5))
            raise ConfigError(str(self.stage_dir), f"{missing} answers are missing (first (prompt, sample) {first})",
                              f"rerun the stage to do them, or {restart}")

    def lines(self) -> Iterator[bytes]:
        """Every record's line, as written, in (item, sample) order."""
        files = [os.open(path, os.O_RDONLY) for path in self.paths]
        try:
            for shard, offset, length in zip(self.shard, self.offset, self.length):
                yield os.pread(files[shard], length, offset) + b"\n"
        finally:
            for file in files:
                os.close(file)
