"""Shards a rerun cannot trust: a line damaged in the middle (not a crash's torn last
line) and answers to prompt ids the run no longer has are errors saying how to start over."""

import json

import pytest

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.data.errors import DataError
from offline_rlhf.generation.shards import kept_records, merge_shards


def write(shard, *lines):
    shard.write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("bad,problem", [
    ('{"id": 1, "sample": 0', "invalid JSON: Expecting ',' delimiter, column 22"),
    ("[1, 2]", "got [1, 2]"),
    ('{"sample": 0}', 'got {"sample": 0}'),
])
def test_a_damaged_middle_line_names_the_shard_line_and_the_way_to_start_over(tmp_path, bad, problem):
    shard = tmp_path / "shard_00001.jsonl"
    write(shard, json.dumps({"id": 0, "sample": 0}), bad, json.dumps({"id": 2, "sample": 0}))
    expected = (f"{shard}:2: expected a shard record with an integer 'id' ({problem}; the shard was damaged other "
                f"than by a crash mid-write); delete {tmp_path}/shard_*.jsonl and rerun the stage")
    for read in (lambda: list(kept_records(shard, 1)), lambda: merge_shards(tmp_path, n_prompts=3)):
        with pytest.raises(DataError) as info:
            read()
        assert str(info.value).startswith(expected)


def test_merge_refuses_answers_to_prompts_the_run_does_not_have(tmp_path):
    write(tmp_path / "shard_00000.jsonl", *(json.dumps({"id": i, "sample": 0}) for i in (0, 1, 2)))
    assert [r["id"] for r in merge_shards(tmp_path, n_prompts=3)] == [0, 1, 2]
    with pytest.raises(ConfigError, match=r": 1 answers are to no prompt of this run \(first \(prompt, sample\) "
                                           r"\[\(2, 0\)\], of 2 prompts with 1 answers each: the inputs changed since "
                                           r"they were written\); delete .*/shard_\*\.jsonl"):
        merge_shards(tmp_path, n_prompts=2)
