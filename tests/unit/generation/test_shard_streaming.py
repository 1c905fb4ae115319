"""Generation's bookkeeping at a million records reads each shard once and holds no record
it does not need: the merge copies the shards' lines into samples.jsonl (byte for byte what
the merge of parsed records wrote, with the same refusals), a resume counts ids as it
repairs, and the prompts' digest is hashed prompt by prompt (the same digest)."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from offline_rlhf.config.errors import ConfigError, ResumeRefused
from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.data.errors import DataError
from offline_rlhf.data.prompts import Prompt
from offline_rlhf.data.records import turns_field
from offline_rlhf.fsutil import append_jsonl_durably
from offline_rlhf.generation.shards import (
    RESTART,
    ShardIndex,
    ShardTokens,
    resume_shards,
    shard_paths,
    shard_record,
)
from offline_rlhf.stages import generate

N = 2  # answers a prompt


def read_shard_records(stage_dir):
    """Every shard's records, all in memory (the stages' way before `kept_records` and
    `ShardIndex`, which read them as they go)."""
    records = []
    for path in shard_paths(stage_dir):
        with open(path, "rb") as handle:
            records += [shard_record(path, number, line) for number, line in enumerate(handle, start=1)]
    return records


def old_merge_shards(stage_dir, n_prompts, n=1):
    """The merge before: every record parsed and held in a dict (a copy, as the baseline)."""
    by_key = {}
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


def old_samples_bytes(records) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in records).encode()


def prompt(i: int) -> Prompt:
    turns = (("user", f"Hi {i} \u00e9"), ("assistant", "Hello \U0001f600"), ("user", f"and {i}?")) if i % 3 == 0 else ()
    return Prompt(id=i, text=f"prompt {i}: \"quoted\" \\ tab\t line\n \u4e2d\u6587", source=f"src{i % 2}",
                  turns=turns)


def record(p: Prompt, sample: int, done_before: bool = False) -> dict:
    """A record as generate's `AnswerWriter.records` makes it."""
    gen = GenerationConfig(max_new_tokens=16, greedy=False, temperature=0.7, top_p=0.95, n=N)
    return {"schema": generate.SCHEMA_VERSION, "id": p.id, "sample": sample, "prompt": p.text,
            **turns_field(p.turns), "response": f"answer {sample} \u00e9\u00e8 \\n {1e-5} \U0001f680 {done_before}",
            "source": p.source, "model": "/run/sft/checkpoints/step_00000003", "gen_config": asdict(gen),
            "finished": sample != 1, "finish_reason": "eos" if sample != 1 else "length",
            "response_tokens": 3 + p.id + sample, "prompt_truncated": p.id % 4 == 1}


def write_shards(stage_dir, prompts, replicas=3, seed=0):
    """Each replica's shard appended as the stage appends it: a prompt's answers together,
    prompts in the order they ended (not by id), a few prompts a write."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    for replica in range(replicas):
        mine = order[replica::replicas]
        for start in range(0, len(mine), 3):
            append_jsonl_durably(stage_dir / f"shard_{replica:05d}.jsonl",
                                 [record(prompts[i], s) for i in mine[start:start + 3] for s in range(N)])


def stub_stage(tmp_path, prompts):
    said = []
    rt = SimpleNamespace(stage_dir=tmp_path, is_main=True, log=said.append, dims=SimpleNamespace(dp=3, tp=1))
    cfg = SimpleNamespace(generation=GenerationConfig(max_new_tokens=16, greedy=False, n=N))
    mix_stats = {"src0": {"skipped": {"empty": 2}}, "src1": {"skipped": {}}}
    return rt, cfg, mix_stats, said


def test_samples_are_the_bytes_the_merge_of_parsed_records_wrote(tmp_path):
    prompts = [prompt(i) for i in range(23)]
    write_shards(tmp_path, prompts)
    rt, cfg, mix_stats, said = stub_stage(tmp_path, prompts)
    usage, done = SimpleNamespace(tokens=0), {0, 5, 7}
    generate.write_outputs(rt, cfg, (prompts, mix_stats, done), "ckpt", 64, usage, 1.0)
    old = old_merge_shards(tmp_path, len(prompts), N)
    assert (tmp_path / generate.SAMPLES).read_bytes() == old_samples_bytes(old)
    assert not list(tmp_path.glob("*.tmp"))
    card = json.loads((tmp_path / "generation_card.json").read_text())
    assert (card["finished"], card["prompt_truncated"]) == (sum(r["finished"] for r in old),
                                                            sum(r["prompt_truncated"] for r in old if r["sample"] == 0))
    assert usage.tokens == sum(r["response_tokens"] for r in old if r["id"] not in done)
    assert said[-1].startswith(f"generate done: {len(old)} answers to 23 prompts")
    assert f"{len(old) - card['finished']} hit max_new_tokens" in said[-1]


def test_a_merge_the_checks_refuse_leaves_no_samples_and_no_temporary_file(tmp_path):
    prompts = [prompt(i) for i in range(6)]
    write_shards(tmp_path, prompts[:5])
    rt, cfg, mix_stats, _ = stub_stage(tmp_path, prompts)
    with pytest.raises(ConfigError, match="2 answers are missing"):
        generate.write_outputs(rt, cfg, (prompts, mix_stats, set()), "ckpt", 64, SimpleNamespace(tokens=0), 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shard_0000{r}.jsonl" for r in range(3)]


def lines(*keys) -> str:
    return "".join(json.dumps({"id": i, "sample": j}) + "\n" for i, j in keys)


@pytest.mark.parametrize("shards,n_prompts", [
    ([[(0, 0), (0, 1), (1, 1)], [(1, 0), (0, 1)]], 2),  # answered twice, across shards
    ([[(0, 0), (1, 0), (0, 0)]], 2),  # answered twice, in one shard
    ([[(0, 0), (0, 1), (1, 1)], [(1, 0)]], 3),  # missing
    ([[(3, 1), (0, 0), (0, 1)], [(1, 0), (1, 1), (2, 5)], [(-1, 0), (7, 0), (7, 0)]], 2),  # twice, of no prompt
    ([[(3, 1), (0, 0), (0, 1)], [(1, 0), (1, 1), (2, 5)], [(-1, 0)]], 2),  # of no prompt
    ([[(i, j) for i in range(20) for j in range(2) if (i, j) not in {(4, 1), (9, 0), (11, 1), (12, 0), (13, 1),
                                                                       (17, 0)}]], 20),  # first 5 of 6 missing
])
def test_the_merge_refuses_what_it_refused_with_the_same_words(tmp_path, shards, n_prompts):
    for replica, keys in enumerate(shards):
        (tmp_path / f"shard_{replica:05d}.jsonl").write_text(lines(*keys))
    with pytest.raises(ConfigError) as old:
        old_merge_shards(tmp_path, n_prompts, 2)
    with pytest.raises(ConfigError) as new:
        ShardIndex(tmp_path, n_prompts, 2)
    assert str(new.value) == str(old.value)


def test_a_damaged_line_is_refused_at_the_merge_too(tmp_path):
    shard = tmp_path / "shard_00000.jsonl"
    shard.write_text(lines((0, 0)) + '{"id": 1, "sam\n' + lines((1, 0)))
    with pytest.raises(DataError, match=rf"^{shard}:2: expected a shard record with an integer 'id' \(invalid JSON"):
        ShardIndex(tmp_path, 2, 1)


def stub_runtime(stage_dir):
    said = []
    return SimpleNamespace(stage_dir=stage_dir, is_main=True, log=said.append, device="cpu", wait_group=None), said


def gen_lines(*keys, prompts=None) -> str:
    prompts = prompts or {}
    return "".join(json.dumps(record(prompts.get(i, prompt(i)), j)) + "\n" for i, j in keys)


def test_a_resume_repairs_and_counts_every_shard_in_one_read(tmp_path):
    """What a repair of each shard, then a read of every record and answered_prompts, then
    check_answered_prompts did, in one read."""
    torn = gen_lines((0, 0), (0, 1), (3, 0), (3, 1), (6, 0)) + gen_lines((6, 1))[:40]
    whole = gen_lines((1, 0), (1, 1), (4, 0), (4, 1))
    (tmp_path / "shard_00000.jsonl").write_text(torn)
    (tmp_path / "shard_00001.jsonl").write_text(whole)
    (tmp_path / "shard_00002.jsonl").write_text("")
    rt, said = stub_runtime(tmp_path)
    seen = []

    def check(records):
        for record in records:
            seen.append((record["id"], record["sample"]))
            yield record
    done = resume_shards(rt, {"generation.seed": 1}, N, generate.SCHEMA_VERSION, check)
    assert done == {0, 3, 1, 4}
    assert (tmp_path / "shard_00000.jsonl").read_text() == gen_lines((0, 0), (0, 1), (3, 0), (3, 1))
    assert (tmp_path / "shard_00001.jsonl").read_text() == whole
    assert said == [f"cut a torn last line (and an incomplete item's records) from {tmp_path}/shard_00000.jsonl"]
    assert seen == [(0, 0), (0, 1), (3, 0), (3, 1), (1, 0), (1, 1), (4, 0), (4, 1)]  # not item 6's, which is cut


def test_a_resume_refuses_answers_to_prompts_that_changed_and_not_those_a_crash_cut(tmp_path):
    prompts = [prompt(i) for i in range(8)]
    was = {i: Prompt(id=i, text=f"another {i}", source="src0", turns=()) for i in (5, 2, 9)}
    (tmp_path / "shard_00000.jsonl").write_text(gen_lines((0, 0), (0, 1), (9, 0), (9, 1), (5, 0), (5, 1), (2, 0),
                                                          (2, 1), prompts=was)[:-1])  # item 2 torn: cut, not refused
    (tmp_path / "shard_00001.jsonl").write_text(gen_lines((3, 0), (3, 1)) + "\n")
    rt, _ = stub_runtime(tmp_path)

    def resume():
        return resume_shards(rt, {"generation.seed": 1}, N, generate.SCHEMA_VERSION,
                             lambda records: generate.check_answered_prompts(records, prompts, tmp_path))
    with pytest.raises(DataError, match="shard_00001.jsonl:3: expected a shard record"):
        resume()  # a blank line is damage, not a torn write
    (tmp_path / "shard_00001.jsonl").write_text(gen_lines((7, 0), (7, 1)))
    with pytest.raises(ResumeRefused) as refused:
        resume()
    assert str(refused.value) == (
        f"sources: the prompt inputs changed since the shards in {tmp_path} were written: 2 answered prompt ids now "
        f"ask another prompt or none (first: prompt 5 was 'another 5', now {prompts[5].text[:60]!r}); restore them, "
        f"or {RESTART.format(stage_dir=tmp_path)}")
    assert [(r["id"], r["sample"]) for r in read_shard_records(tmp_path)] == [
        (0, 0), (0, 1), (9, 0), (9, 1), (5, 0), (5, 1), (7, 0), (7, 1)]


def test_a_resume_refuses_another_version_s_records(tmp_path):
    (tmp_path / "shard_00000.jsonl").write_text(gen_lines((0, 0), (0, 1)) + lines((1, 0), (1, 1)))
    rt, _ = stub_runtime(tmp_path)
    with pytest.raises(DataError, match=r"shard_00000.jsonl:3: expected records of schema 3, this version's \(got "
                                        r"None: another version wrote them"):
        resume_shards(rt, {"generation.seed": 1}, N, generate.SCHEMA_VERSION)


def test_the_progress_count_from_now_waits_for_a_line_being_written(tmp_path):
    shard = tmp_path / "shard_00000.jsonl"
    shard.write_text(lines((0, 0)) * 50 + '{"id": 1, "text": "' + "x" * 150_000)  # read back over 3 blocks
    tally = ShardTokens(tmp_path, lambda record: 1 + record["id"], from_now=True)
    assert tally.count() == 0 and tally.records == 0
    with open(shard, "a") as handle:
        handle.write('", "sample": 0}\n' + lines((2, 0)))
    assert (tally.count(), tally.records) == (5, 2)
    assert ShardTokens(tmp_path / "none", len, from_now=True).count() == 0


PINNED = "c6b964598f26e868f854c6c38098c7e3473b945b46211a1ed967cbcb031adcf0"  # by the code before (one JSON string)


@pytest.mark.parametrize("count", [0, 1, 7])
def test_the_prompts_digest_is_the_digest_of_them_as_one_json_string(count):
    """Resume fingerprints hold it: a changed digest would refuse every existing partial run."""
    prompts = [prompt(i) for i in range(count)]
    whole = json.dumps([[p.id, p.text, p.source, turns_field(p.turns)] for p in prompts])
    assert generate.prompts_sha256(prompts) == hashlib.sha256(whole.encode()).hexdigest()


def test_the_prompts_digest_is_pinned():
    assert generate.prompts_sha256([prompt(i) for i in range(7)]) == PINNED


def test_the_card_counts_are_those_of_the_merged_records():
    counts, done = Counter(), {1}
    for r in [record(prompt(i), s) for i in range(4) for s in range(N)]:
        generate.count_samples(counts, done, r)
    assert counts == Counter(finished=4, prompt_truncated=1, new_tokens=sum(3 + i + s for i in (0, 2, 3)
                                                                             for s in range(N)))
