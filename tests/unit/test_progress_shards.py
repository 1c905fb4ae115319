"""Rank 0's progress of a sharded stage (generate, reference) is read from every replica's
shard: it starts at the items done before this execution and counts whole items (`n`
records each) that any replica has written since, up to each shard's last whole line."""

import io
import json
from types import SimpleNamespace

from offline_rlhf.generation.shards import new_records, show_shards
from offline_rlhf.progress import PREFIX, Progress


class Usage:
    def __init__(self):
        self.tokens, self.beats = 0, 0

    def beat(self, force: bool = False) -> None:
        self.beats += 1


def lines(*records: tuple[int, int]) -> str:
    return "".join(json.dumps({"id": i, "sample": s, "response_tokens": 3}) + "\n" for i, s in records)


def test_the_bar_counts_every_replica_s_whole_items_from_those_done_before(tmp_path):
    first, second = tmp_path / "shard_00000.jsonl", tmp_path / "shard_00001.jsonl"
    first.write_text(lines((0, 0), (0, 1)))  # answered by an earlier execution
    counted = new_records(SimpleNamespace(stage_dir=tmp_path), lambda record: record["response_tokens"])
    out, usage = io.StringIO(), Usage()
    bar = Progress("generate", 4, initial=1, stream=out, every_s=0.0, unit="prompt")
    with open(first, "a") as handle:
        handle.write(lines((1, 0), (1, 1)))
    second.write_text(lines((3, 0), (3, 1)) + '{"id": 2, "sam')  # replica 1, mid-write
    show_shards(counted, usage, bar, n=2)
    assert (bar.done, usage.tokens, usage.beats) == (3, 12, 1)
    with open(second, "a") as handle:
        handle.write('ple": 0, "response_tokens": 3}\n' + lines((2, 1)))
    show_shards(counted, usage, bar, n=2)
    bar.close()
    assert (bar.done, usage.tokens) == (4, 18)
    shown = [line.split(" tok_s=")[0] for line in out.getvalue().splitlines()]
    assert shown == [f"{PREFIX}generate: prompt 3/4 (75%)", f"{PREFIX}generate: prompt 4/4 (100%)"]
