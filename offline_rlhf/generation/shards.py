"""Durable per-replica generation shards: each data-parallel replica appends its answers to
its own `shard_XXXXX.jsonl` with fsync, so a crash loses at most the batch in flight and a
rerun never answers a prompt twice; the merge checks every prompt was answered once.
Also which contiguous block of prompts each replica takes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from offline_rlhf.fsutil import write_atomic
from offline_rlhf.stage_support import check_resumable

FINGERPRINT = "shards_config.json"


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


def repair_shard(path: Path) -> int:
    """Cut a torn last line (a crash during a write); returns the bytes removed."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    return len(data) - keep


def read_shard_records(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for path in shard_paths(stage_dir) for line in path.read_text().splitlines() if line]


def append_durably(path: Path, records: list[dict]) -> None:
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


def merge_shards(stage_dir: Path, n_prompts: int) -> list[dict]:
    """All shard records ordered by id; every prompt exactly once, or an error."""
    by_id: dict[int, dict] = {}
    for record in read_shard_records(stage_dir):
        if record["id"] in by_id:
            raise RuntimeError(f"prompt {record['id']} was answered twice in {stage_dir}")
        by_id[record["id"]] = record
    missing = sorted(set(range(n_prompts)) - set(by_id))
    if missing:
        raise RuntimeError(f"{len(missing)} prompts have no answer in {stage_dir} (first ids {missing[:5]})")
    return [by_id[i] for i in range(n_prompts)]
