"""Rank 0's running count of every replica's shard tokens (its ledger heartbeat's)."""

import json

from offline_rlhf.generation.shards import ShardTokens


def record(prompt_id: int, tokens: int) -> str:
    return json.dumps({"schema": 3, "id": prompt_id, "sample": 0, "response_tokens": tokens}) + "\n"


def test_counts_whole_lines_of_every_shard_and_reads_each_on_from_where_it_stopped(tmp_path):
    first, second = tmp_path / "shard_00000.jsonl", tmp_path / "shard_00001.jsonl"
    first.write_text(record(0, 5) + record(1, 7))
    tally = ShardTokens(tmp_path)
    assert tally.count() == 12
    second.write_text(record(2, 3) + '{"schema": 3, "id": 3, "response_tok')  # replica 1 mid-write
    assert tally.count() == 15
    with open(second, "a") as handle:
        handle.write('ens": 4}\n')
    with open(first, "a") as handle:
        handle.write(record(4, 1))
    assert tally.count() == 20 and tally.count() == 20  # nothing counted twice
