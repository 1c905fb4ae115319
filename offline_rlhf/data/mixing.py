"""Weighted mixing of data sources and the train/validation split (no torch here).

Every random choice comes from a `random.Random` seeded from the caller's seed and
a fixed label, never from the global generator, so a seed fixes the result. String
seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Hashable, Sequence
from fractions import Fraction
from typing import Any

Source = tuple[str, Sequence[Any], float]  # (name, items, weight)


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Counts proportional to `weights` that sum to exactly `total`.

    Largest-remainder rounding: each count is the floor of its exact quota
    `total * w / sum(w)`; the leftover units go to the largest fractional parts,
    ties to the earlier source. Exact fractions keep it platform-independent.
    """
    quotas = [Fraction(total) * Fraction(w) / sum(map(Fraction, weights)) for w in weights]
    counts = [int(quota) for quota in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def _draw(items: Sequence[Any], count: int, rng: random.Random) -> list[Any]:
    """`count` items: a seeded permutation, repeated from its start when `count`
    exceeds the items (so every item appears floor or ceil of count/len times)."""
    order = list(range(len(items)))
    rng.shuffle(order)
    return [items[order[i % len(items)]] for i in range(count)]


def _check_sources(sources: Sequence[Source]) -> None:
    names = [name for name, _, _ in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    for name, items, weight in sources:
        if not items:
            raise ValueError(f"source {name!r} has no examples")
        if weight <= 0:
            raise ValueError(f"source {name!r}: weight must be > 0, got {weight}")


def mix_sources(sources: Sequence[Source], total: int | None, seed: int) -> tuple[list[Any], dict[str, dict]]:
    """Mix `(name, items, weight)` sources into one seeded-shuffled list.

    total=None: every item of every source exactly once (weights unused).
    total=N: source i gets `apportion(N, weights)[i]` items, drawn without
    replacement while it has enough and by repeating its permutation beyond that
    (upsampling; `repeated` counts the extra copies). Each source draws from its
    own generator, so adding a source does not change what another contributes.
    Returns the items and per-source stats {available, taken, repeated}.
    """
    _check_sources(sources)
    if total is not None and total <= 0:
        raise ValueError(f"total must be positive or None, got {total}")
    counts = ([len(items) for _, items, _ in sources] if total is None
              else apportion(total, [weight for _, _, weight in sources]))
    mixed, stats = [], {}
    for (name, items, _), count in zip(sources, counts):
        mixed.extend(_draw(items, count, random.Random(f"{seed}:source:{name}")))
        stats[name] = {"available": len(items), "taken": count, "repeated": max(0, count - len(items))}
    random.Random(f"{seed}:order").shuffle(mixed)
    return mixed, stats


def validation_size(distinct: int, fraction: float) -> int:
    """round(distinct * fraction), at least 1 when fraction > 0 and distinct >= 2,
    and never all of them (training keeps at least one)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    size = round(distinct * fraction)
    if fraction > 0 and distinct >= 2:
        size = max(size, 1)
    return min(size, max(distinct - 1, 0))


def content_key(*texts: str) -> str:
    """A digest of an example's text fields, its identity for the split and for dedupe:
    copies of one record at different lines (or in different sources) share it."""
    digest = hashlib.blake2b(digest_size=16)
    for text in texts:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)  # length-prefixed: ("ab", "c") != ("a", "bc")
    return digest.hexdigest()


def split_validation(items: Sequence[Hashable], fraction: float, seed: int,
                     key: Callable[[Any], Hashable] | None = None) -> tuple[list, list]:
    """Deterministic (train, val) split; both keep the input order.

    The split is over DISTINCT keys (`key(item)`, default the item itself): items with
    equal keys go to the same side, so an example repeated by upsampling, or copied at
    another line of a file when `key` is its `content_key`, never lands in both train
    and val. Without duplicates, val has exactly `validation_size(len(items), fraction)` items.
    """
    keys = [item if key is None else key(item) for item in items]
    distinct = list(dict.fromkeys(keys))
    val_keys = set(random.Random(f"{seed}:split").sample(distinct, validation_size(len(distinct), fraction)))
    train = [item for item, k in zip(items, keys) if k not in val_keys]
    val = [item for item, k in zip(items, keys) if k in val_keys]
    return train, val


def drop_duplicates(sources: Sequence[Source], key: Callable[[Any], Hashable],
                    dedupe: bool) -> tuple[list[Source], dict[str, int]]:
    """Count, per source, the items whose `key` an earlier item (of any source, in source
    order) already had; with `dedupe`, drop them (the first copy stays). Returns the
    sources (unchanged unless dedupe) and {name: duplicates}."""
    seen: set = set()
    kept, duplicates = [], {}
    for name, items, weight in sources:
        unique = []
        for item in items:
            k = key(item)
            if k not in seen:
                seen.add(k)
                unique.append(item)
        duplicates[name] = len(items) - len(unique)
        kept.append((name, unique if dedupe else items, weight))
    return kept, duplicates
