"""Rank 0's running count of every replica's shard tokens (its ledger heartbeat's)."""

import json

from offline_rlhf.generation.shards import ShardTokens


def record(prompt_id: int, tokens: int) -> str:
    return json.dumps({"schema": 3, "id": prompt_id, "sample": 0, "response_tokens": tokens}) + "\n"


def test_counts_whole_lines_of_every_shard_and_reads_each_on_from_where_it_stopped(tmp_path):
    first, second = tmp_path / "shard_00000.jsonl", tmp_path / "shard_00001.jsonl"
    first.write_text(record(0, 5) + record(1, 7))
    tally = ShardTokens(tmp_path, lambda record: record["response_tokens"])
    assert tally.count() == 12
    second.write_text(record(2, 3) + '{"schema": 3, "id": 3, "response_tok')  # replica 1 mid-write
    assert tally.count() == 15
    with open(second, "a") as handle:
        handle.write('ens": 4}\n')
    with open(first, "a") as handle:
        handle.write(record(4, 1))
    assert tally.count() == 20 and tally.count() == 20  # nothing counted twice


def test_a_stage_counts_its_records_its_own_way_and_skips_what_it_cannot_count(tmp_path):
    """Reference's records carry no count: a pair's tokens are looked up by its id."""
    tokens = [10, 20, 30]
    (tmp_path / "shard_00000.jsonl").write_text('{"id": 0}\n{"id": 2}\n{"id": 7}\n["not", "a", "record"]\n')
    assert ShardTokens(tmp_path, lambda record: tokens[record["id"]]).count() == 40
