"""Source mixing (exact counts, upsampling, determinism) and the validation split."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest

from offline_rlhf.data.mixing import apportion, mix_sources, split_validation, validation_size


def source(name, size, weight=1.0):
    return (name, [f"{name}{i}" for i in range(size)], weight)


def per_source(items):
    return Counter(item.rstrip("0123456789") for item in items)


@pytest.mark.parametrize("total, weights, expected", [
    (100, [1, 3], [25, 75]),
    (10, [1, 1, 1], [4, 3, 3]),  # one leftover unit, tie goes to the first source
    (7, [0.1, 0.2, 0.7], [1, 1, 5]),  # quotas 0.7, 1.4, 4.9
    (5, [2, 1], [3, 2]),  # quotas 3.33, 1.67: the larger remainder wins
])
def test_apportion_sums_exactly_and_stays_within_one_of_the_quota(total, weights, expected):
    counts = apportion(total, weights)
    assert counts == expected
    assert sum(counts) == total
    quotas = [Fraction(total) * Fraction(w) / sum(map(Fraction, weights)) for w in weights]
    assert all(abs(count - quota) < 1 for count, quota in zip(counts, quotas))


def test_total_takes_weighted_counts_without_replacement_when_available():
    items, stats = mix_sources([source("a", 10), source("b", 50, 3.0)], total=40, seed=0)
    assert per_source(items) == {"a": 10, "b": 30}
    assert len(set(items)) == 40  # no repeats while enough items exist
    assert stats == {"a": {"available": 10, "taken": 10, "repeated": 0},
                     "b": {"available": 50, "taken": 30, "repeated": 0}}


def test_upsampling_repeats_a_permutation_and_counts_the_repeats():
    items, stats = mix_sources([source("a", 10), source("b", 50, 3.0)], total=100, seed=0)
    assert stats["a"] == {"available": 10, "taken": 25, "repeated": 15}
    assert stats["b"] == {"available": 50, "taken": 75, "repeated": 25}
    copies = Counter(items)
    # 25 draws of 10 items: every item 2 or 3 times, 5 of them 3 times.
    assert sorted(copies[f"a{i}"] for i in range(10)) == [2] * 5 + [3] * 5
    assert sum(copies[f"b{i}"] == 2 for i in range(50)) == 25


def test_total_none_takes_every_item_once_and_ignores_weights():
    items, stats = mix_sources([source("a", 7, 100.0), source("b", 3)], total=None, seed=0)
    assert sorted(items) == sorted(source("a", 7)[1] + source("b", 3)[1])
    assert stats["a"] == {"available": 7, "taken": 7, "repeated": 0}


def test_a_seed_fixes_the_mix_and_another_seed_changes_it():
    sources = [source("a", 30), source("b", 30)]
    first, _ = mix_sources(sources, total=40, seed=1)
    assert mix_sources(sources, total=40, seed=1)[0] == first
    other, _ = mix_sources(sources, total=40, seed=2)
    assert other != first and per_source(other) == per_source(first)
    # The output is shuffled across sources, not one source after the other.
    assert first[:20] != sorted(first[:20], key=lambda item: item[0])


def test_a_source_draws_the_same_items_whatever_else_is_mixed():
    alone, _ = mix_sources([source("a", 30)], total=12, seed=5)
    mixed, _ = mix_sources([source("a", 30), source("b", 30)], total=24, seed=5)
    assert sorted(alone) == sorted(item for item in mixed if item.startswith("a"))


@pytest.mark.parametrize("sources, message", [
    ([source("a", 3), source("empty", 0)], "source 'empty' has no examples"),
    ([source("a", 3), source("a", 4)], "unique"),
    ([source("a", 3, 0.0)], "weight must be > 0"),
])
def test_bad_sources_are_refused(sources, message):
    with pytest.raises(ValueError, match=message):
        mix_sources(sources, total=None, seed=0)


@pytest.mark.parametrize("size, fraction, expected", [
    (100, 0.1, 10), (5, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0), (10, 0.0, 0), (0, 0.1, 0),
])
def test_validation_size(size, fraction, expected):
    assert validation_size(size, fraction) == expected


def test_split_is_deterministic_disjoint_and_keeps_order():
    items = [f"x{i}" for i in range(50)]
    train, val = split_validation(items, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val) == sorted(items)
    assert train == [item for item in items if item in train] and val == [item for item in items if item in val]
    assert split_validation(items, 0.2, seed=3) == (train, val)
    assert split_validation(items, 0.2, seed=4)[1] != val


def test_copies_of_an_item_land_on_one_side():
    items, _ = mix_sources([source("a", 10)], total=40, seed=0)  # every item 4 times
    train, val = split_validation(items, 0.2, seed=0)
    assert not set(train) & set(val)
    assert len(set(val)) == 2 and len(val) == 8
