"""Durable shards with n answers per prompt: a crash mid-write never leaves a prompt with
part of its answers, and the merge wants every (prompt, sample) exactly once."""

from __future__ import annotations

import json
import re

import pytest

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.data.errors import DataError
from offline_rlhf.generation.shards import answered_prompts, kept_records, merge_shards


def lines(*keys):
    return "".join(json.dumps({"id": i, "sample": j}) + "\n" for i, j in keys)


def kept(path, n, schema=None):
    """What `kept_records` (a resume's one read of a shard) yields, and the bytes it cut."""
    records, reading = [], kept_records(path, n, schema)
    while True:
        try:
            records.append(next(reading))
        except StopIteration as end:
            return records, end.value


def test_a_torn_line_then_the_incomplete_last_prompt_are_cut_and_not_read(tmp_path):
    shard = tmp_path / "shard_00000.jsonl"
    shard.write_text(lines((0, 0), (0, 1), (1, 0)) + '{"id": 1, "sam')
    records, removed = kept(shard, n=2)
    assert records == [{"id": 0, "sample": 0}, {"id": 0, "sample": 1}]
    assert shard.read_text() == lines((0, 0), (0, 1))
    assert removed == len(lines((1, 0))) + len('{"id": 1, "sam')


@pytest.mark.parametrize("n,content", [(1, [(0, 0), (1, 0)]), (2, [(0, 0), (0, 1)]), (2, [])])
def test_complete_shards_are_read_whole_and_left_alone(tmp_path, n, content):
    shard = tmp_path / "shard_00000.jsonl"
    shard.write_text(lines(*content))
    records, removed = kept(shard, n)
    assert removed == 0 and shard.read_text() == lines(*content)
    assert records == [{"id": i, "sample": j} for i, j in content]


def test_an_incomplete_or_repeated_item_before_the_last_is_damage_named_at_once(tmp_path):
    """Was: found only at the merge, after every remaining prompt had been generated, as a
    RuntimeError traceback ("answered twice")."""
    shard = tmp_path / "shard_00000.jsonl"
    for content, line, found in (([(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)], 1, 1),  # item 0 lost a line
                                 ([(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 1)], 1, 4)):  # item 0 twice
        shard.write_text(lines(*content))
        with pytest.raises(DataError, match=rf"^{shard}:{line}: expected the 2 record\(s\) of item 0 together, once "
                                            rf"\(found {found}: the shard was damaged other than by a crash"):
            kept(shard, 2)


def test_answered_prompts_need_all_their_samples():
    records = [{"id": 0}, {"id": 0}, {"id": 1}]
    assert answered_prompts(records, 2) == {0} and answered_prompts(records, 1) == {0, 1}


def test_merge_orders_by_prompt_and_sample_and_refuses_gaps_and_repeats(tmp_path):
    (tmp_path / "shard_00000.jsonl").write_text(lines((1, 1), (0, 0)))
    (tmp_path / "shard_00001.jsonl").write_text(lines((1, 0), (0, 1)))
    merged = merge_shards(tmp_path, n_prompts=2, n=2)
    assert [(r["id"], r["sample"]) for r in merged] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(ConfigError, match=r"answers are missing \(first \(prompt, sample\) \[\(2, 0\)"):
        merge_shards(tmp_path, n_prompts=3, n=2)
    (tmp_path / "shard_00002.jsonl").write_text(lines((0, 1)))
    with pytest.raises(ConfigError, match="prompt 0 \\(sample 1\\) was answered twice"):
        merge_shards(tmp_path, n_prompts=2, n=2)


def test_records_of_another_schema_are_refused_with_the_way_to_start_over(tmp_path):
    """Another version's records (generate's before `turns`) must not mix into this version's output."""
    current = [{"schema": 3, "id": 0, "sample": 0}, {"schema": 3, "id": 1, "sample": 0}]
    (tmp_path / "shard_00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in current))
    assert kept(tmp_path / "shard_00000.jsonl", 1, 3) == (current, 0)
    (mixed := tmp_path / "shard_00001.jsonl").write_text(json.dumps({"schema": 3, "id": 2}) + "\n" +
                                                         json.dumps({"schema": 2, "id": 3}) + "\n")
    assert len(kept(mixed, 1)[0]) == 2  # a stage without a schema reads them all
    where, restart = re.escape(f"{mixed}:2"), re.escape(f"delete {tmp_path}/shard_*.jsonl")
    with pytest.raises(DataError, match=rf"^{where}: expected records of schema 3, this version's \(got 2: .*\); "
                                        rf"{restart} and rerun the stage"):
        kept(mixed, 1, 3)
