"""Split prompts over data-parallel generation replicas (no torch import)."""

from __future__ import annotations


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
