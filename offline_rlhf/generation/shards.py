"""Durable per-replica generation shards: each data-parallel replica appends its answers to
its own `shard_XXXXX.jsonl` with fsync, so a crash loses at most the batch in flight and a
rerun never answers a prompt twice; the merge checks every prompt was answered once.
Also which contiguous block of prompts each replica takes."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.data.errors import DataError
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.progress import Progress
from offline_rlhf.runtime import Runtime, raise_everywhere
from offline_rlhf.stage_support import check_resumable

FINGERPRINT = "shards_config.json"
RESTART = "delete {stage_dir}/shard_*.jsonl and rerun the stage to do every item again"


def resume_shards(rt: Runtime, fingerprint: dict, n: int, schema: int | None = None) -> tuple[set[int], list[dict]]:
    """The items (each with `n` records) done by an earlier run under the same config, and
    their records: rank 0 claims the shards for `fingerprint` and cuts what a crash tore,
    then every rank reads (and with `schema`, refuses records another version of the stage
    wrote: `read_shard_records`)."""
    problem = None
    if rt.is_main:
        try:
            claim_shards(rt.stage_dir, fingerprint)
            for path in shard_paths(rt.stage_dir):
                if repair_shard(path, n):
                    rt.log(f"cut a torn last line (and an incomplete item's records) from {path}")
        except (ConfigError, DataError) as err:  # a changed config, a damaged shard
            problem = err
    raise_everywhere(problem, rt.device, "resume the shards")
    records = read_shard_records(rt.stage_dir, schema)
    return answered_prompts(records, n), records


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

    def __init__(self, stage_dir: Path, tokens_of: Callable[[dict], int]):
        self.stage_dir, self.tokens_of, self.total, self.records = stage_dir, tokens_of, 0, 0
        self._read: dict[Path, int] = {}  # shard -> bytes counted

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
    tally = ShardTokens(rt.stage_dir, tokens_of)
    earlier = tally.count(), tally.records

    def since() -> tuple[int, int]:
        tokens = tally.count()
        return tally.records - earlier[1], tokens - earlier[0]
    return since


def show_shards(counted: Callable[[], tuple[int, int]], usage, bar: Progress, n: int = 1) -> None:
    """Rank 0, while the replicas work: what every replica wrote since this execution began
    (`new_records`) into the ledger's heartbeat (a killed run's row then counts the tokens
    the shards kept) and into `bar`, which started at the items done before (`n` records
    each): rank 0's progress covers the whole stage, not its own share."""
    records, usage.tokens = counted()
    usage.beat(force=True)
    rate = usage.tokens / max(time.monotonic() - bar.started, 1e-9)
    bar.update(bar.first + records // n - bar.done, tok_s=f"{rate:.0f}")


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


def repair_shard(path: Path, n: int) -> int:
    """Cut what a crash during a write left: a torn last line, then the answers of a prompt
    that has fewer than its `n` (a prompt's answers are appended together, so only the
    last prompt can be incomplete). Returns the bytes removed."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    lines = data[:keep].splitlines(keepends=True)
    ids = [shard_record(path, number, line)["id"] for number, line in enumerate(lines, start=1)]
    last_run = next((k for k, prompt_id in enumerate(reversed(ids)) if prompt_id != ids[-1]), len(ids))
    if 0 < last_run < n:
        keep -= sum(map(len, lines[-last_run:]))
        ids = ids[:-last_run]
    _check_whole_items(path, ids, n)
    if keep < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    return len(data) - keep


def _check_whole_items(path: Path, ids: list[int], n: int) -> None:
    """Every item's `n` records, written together, are in the shard once: fewer or more
    means a hand edit or a copy, not a crash (found before any work, not at the merge)."""
    counts = Counter(ids)
    for number, item in enumerate(ids, start=1):
        if counts[item] != n:
            raise DataError(path, number, f"expected the {n} record(s) of item {item} together, once (found "
                            f"{counts[item]}: the shard was damaged other than by a crash mid-write); "
                            f"{RESTART.format(stage_dir=path.parent)}")


def read_shard_records(stage_dir: Path, schema: int | None = None) -> list[dict]:
    """Every shard's records. With `schema`, each must carry it as its `schema`: records of
    another version (other fields, or fields that mean other things) would mix into one
    output with this version's, so a run they came from cannot be resumed."""
    records = []
    for path in shard_paths(stage_dir):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line:
                records.append(shard_record(path, number, line))
                if schema is not None and records[-1].get("schema") != schema:
                    raise DataError(path, number, f"expected records of schema {schema}, this version's (got "
                                    f"{records[-1].get('schema')}: another version wrote them, and cannot be resumed); "
                                    f"{RESTART.format(stage_dir=stage_dir)}")
    return records


def shard_record(path: Path, number: int, line: str | bytes) -> dict:
    """Line `number` of shard `path` as its record. A crash tears only the last line
    (`repair_shard` cuts it); anything else that is no record was damaged otherwise, and
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


def answered_prompts(records: list[dict], n: int) -> set[int]:
    """Prompt ids with all n answers written."""
    counts = Counter(record["id"] for record in records)
    return {prompt_id for prompt_id, count in counts.items() if count >= n}


def merge_shards(stage_dir: Path, n_prompts: int, n: int = 1) -> list[dict]:
    """All shard records ordered by (prompt id, sample); every answer exactly once, or a
    one-line error naming the stage folder and the way out."""
    by_key: dict[tuple[int, int], dict] = {}
    restart = RESTART.format(stage_dir=stage_dir)
    for record in read_shard_records(stage_dir):
        key = (record["id"], record.get("sample", 0))
        if key in by_key:
            raise ConfigError(str(stage_dir), f"prompt {key[0]} (sample {key[1]}) was answered twice (two runs wrote "
                              "its shards at once?)", restart)
        by_key[key] = record
    expected = {(i, j) for i in range(n_prompts) for j in range(n)}
    if unexpected := sorted(set(by_key) - expected):
        raise ConfigError(str(stage_dir), f"{len(unexpected)} answers are to no prompt of this run (first (prompt, "
                          f"sample) {unexpected[:5]}, of {n_prompts} prompts with {n} answers each: the inputs "
                          "changed since they were written)", restart)
    missing = sorted(expected - set(by_key))
    if missing:
        raise ConfigError(str(stage_dir), f"{len(missing)} answers are missing (first (prompt, sample) "
                          f"{missing[:5]})", f"rerun the stage to do them, or {restart}")
    return [by_key[(i, j)] for i in range(n_prompts) for j in range(n)]
