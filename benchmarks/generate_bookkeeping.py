"""Time and peak memory of `orlhf generate`'s bookkeeping on N synthetic shard records
(the real format, n answers a prompt, ~1.5 KB a record, over several replicas' shards):
what a resume costs rank 0 and every other rank, the end-of-run merge into samples.jsonl
and the prompts' digest, each the way the code does it now against the way it did before
(copied below as the named baseline). Every case runs in its own process: its peak RSS
(`ru_maxrss`) is its own, and the table also gives the process's peak before the case
(imports, the prompts). The merge's two outputs are compared byte for byte.

    python benchmarks/generate_bookkeeping.py --records 250000 --dir /tmp/generate_bookkeeping
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import random
import resource
import subprocess
import sys
import time
from array import array
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from offline_rlhf.config.errors import ConfigError, ResumeRefused  # noqa: E402
from offline_rlhf.config.schema import GenerationConfig  # noqa: E402
from offline_rlhf.data.prompts import Prompt  # noqa: E402
from offline_rlhf.data.records import turns_field  # noqa: E402
from offline_rlhf.generation import shards  # noqa: E402
from offline_rlhf.stages import generate  # noqa: E402

WORDS = "the of and a to in is you that it he was for on are as with his they at be this have from".split()
GEN = GenerationConfig(max_new_tokens=1024, greedy=False, n=4)


# --- the code before (the baseline): every record read by every rank and held -------------------------------------

def old_repair_shard(path: Path, n: int) -> int:
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    lines = data[:keep].splitlines(keepends=True)
    ids = [shards.shard_record(path, number, line)["id"] for number, line in enumerate(lines, start=1)]
    last_run = next((k for k, prompt_id in enumerate(reversed(ids)) if prompt_id != ids[-1]), len(ids))
    if 0 < last_run < n:
        keep -= sum(map(len, lines[-last_run:]))
        ids = ids[:-last_run]
    shards._check_whole_items(path, ids, n)
    if keep < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    return len(data) - keep


def old_read_shard_records(stage_dir: Path, schema: int | None = None) -> list[dict]:
    records = []
    for path in shards.shard_paths(stage_dir):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line:
                records.append(shards.shard_record(path, number, line))
                if schema is not None and records[-1].get("schema") != schema:
                    raise ValueError(f"{path}:{number}: schema")
    return records


def old_check_answered_prompts(records: list[dict], prompts: list[Prompt]) -> None:
    def asked(record: dict) -> tuple[str, list | None]:
        return record["prompt"], record.get("turns")

    changed = sorted({r["id"] for r in records if not 0 <= r["id"] < len(prompts)
                      or asked(r) != (prompts[r["id"]].text, turns_field(prompts[r["id"]].turns).get("turns"))})
    if changed:
        raise ResumeRefused("sources", f"{len(changed)} changed")


def old_merge_shards(stage_dir: Path, n_prompts: int, n: int = 1) -> list[dict]:
    by_key: dict[tuple[int, int], dict] = {}
    for record in old_read_shard_records(stage_dir):
        key = (record["id"], record.get("sample", 0))
        if key in by_key:
            raise ConfigError(str(stage_dir), f"prompt {key[0]} (sample {key[1]}) was answered twice")
        by_key[key] = record
    expected = {(i, j) for i in range(n_prompts) for j in range(n)}
    if set(by_key) - expected or expected - set(by_key):
        raise ConfigError(str(stage_dir), "unexpected or missing answers")
    return [by_key[(i, j)] for i in range(n_prompts) for j in range(n)]


def old_write_jsonl(path: Path, rows) -> None:
    from offline_rlhf.fsutil import write_atomic
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def old_prompts_sha256(prompts: list[Prompt]) -> str:
    return hashlib.sha256(json.dumps([[p.id, p.text, p.source, turns_field(p.turns)] for p in prompts]).encode()
                          ).hexdigest()


# --- the synthetic run ---------------------------------------------------------------------------------------------

def prompt(i: int) -> Prompt:
    words = random.Random(i)
    turns = (("user", "Hi."), ("assistant", "Hello."), ("user", f"question {i}?")) if i % 10 == 0 else ()
    return Prompt(id=i, text=" ".join(words.choice(WORDS) for _ in range(100)), source="hh", turns=turns)


def make_shards(stage_dir: Path, records: int, replicas: int) -> int:
    """Shards as `orlhf generate`'s replicas write them (`AnswerWriter.records`); the number of prompts."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    for old in shards.shard_paths(stage_dir):
        old.unlink()
    n_prompts, text = records // GEN.n, random.Random(0)
    for replica in range(replicas):
        with open(stage_dir / f"shard_{replica:05d}.jsonl", "w") as handle:
            for i in shards.shard_indices(n_prompts, replica, replicas):
                p = prompt(i)
                for sample in range(GEN.n):
                    response = " ".join(text.choice(WORDS) for _ in range(200))
                    handle.write(json.dumps({
                        "schema": generate.SCHEMA_VERSION, "id": i, "sample": sample, "prompt": p.text,
                        **turns_field(p.turns), "response": response, "source": p.source,
                        "model": "/scratch/run/sft/checkpoints/step_00100000", "gen_config": asdict(GEN),
                        "finished": sample != 3, "finish_reason": "eos" if sample != 3 else "length",
                        "response_tokens": 250, "prompt_truncated": i % 7 == 0}) + "\n")
    (stage_dir / shards.FINGERPRINT).write_text(json.dumps({"generation.seed": 0}))
    return n_prompts


def stub_rt(stage_dir: Path):
    return SimpleNamespace(stage_dir=stage_dir, is_main=True, log=lambda message: None, device="cpu",
                           wait_group=None, dims=SimpleNamespace(dp=8, tp=1))


def tokens_of(record: dict) -> int:
    return record.get("response_tokens", 0)


# --- the cases, each run in its own process ------------------------------------------------------------------------

def resume_rank0_old(stage_dir, n_prompts, prompts):
    for path in shards.shard_paths(stage_dir):
        old_repair_shard(path, GEN.n)
    records = old_read_shard_records(stage_dir, generate.SCHEMA_VERSION)
    done = shards.answered_prompts(records, GEN.n)
    shards.ShardTokens(stage_dir, tokens_of).count()  # new_records' first count
    old_check_answered_prompts(records, prompts)
    return len(done)


def resume_rank0_new(stage_dir, n_prompts, prompts):
    rt = stub_rt(stage_dir)
    done = shards.resume_shards(rt, {"generation.seed": 0}, GEN.n, generate.SCHEMA_VERSION,
                                lambda records: generate.check_answered_prompts(records, prompts, stage_dir))
    shards.new_records(rt, tokens_of)
    return len(done)


def resume_other_old(stage_dir, n_prompts, prompts):
    records = old_read_shard_records(stage_dir, generate.SCHEMA_VERSION)
    done = shards.answered_prompts(records, GEN.n)
    old_check_answered_prompts(records, prompts)
    return len(done)


def resume_other_new(stage_dir, n_prompts, prompts):
    """What the other ranks now get: rank 0's `done`, as `broadcast_object_list` pickles it."""
    import pickle
    sent = pickle.dumps(array("q", range(n_prompts)))
    return len(set(pickle.loads(sent)))


def merge_old(stage_dir, n_prompts, prompts):
    records = old_merge_shards(stage_dir, n_prompts, GEN.n)
    old_write_jsonl(stage_dir / "samples_old.jsonl", records)
    card = {"finished": sum(r["finished"] for r in records),
            "prompt_truncated": sum(r["prompt_truncated"] for r in records if r["sample"] == 0),
            "tokens": sum(r["response_tokens"] for r in records)}
    return card["finished"]


def merge_new(stage_dir, n_prompts, prompts):
    cfg, usage = SimpleNamespace(generation=GEN), SimpleNamespace(tokens=0)
    mix_stats = {"hh": {"skipped": {}}}
    generate.write_outputs(stub_rt(stage_dir), cfg, (range(n_prompts), mix_stats, set()), "ckpt", 1024, usage, 1.0)
    return json.loads((stage_dir / "generation_card.json").read_text())["finished"]


def digest_old(stage_dir, n_prompts, prompts):
    return old_prompts_sha256(prompts)


def digest_new(stage_dir, n_prompts, prompts):
    return generate.prompts_sha256(prompts)


CASES = {  # name: (the baseline, the code now)
    "resume, rank 0": (resume_rank0_old, resume_rank0_new),
    "resume, every other rank": (resume_other_old, resume_other_new),
    "merge into samples.jsonl": (merge_old, merge_new),
    "prompts_sha256": (digest_old, digest_new),
}
NEEDS_PROMPTS = {"resume, rank 0", "resume, every other rank", "prompts_sha256"}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(name: str, which: int, stage_dir: Path, n_prompts: int) -> None:
    prompts = [prompt(i) for i in range(n_prompts)] if name in NEEDS_PROMPTS else []
    before = peak_mb()
    started = time.perf_counter()
    result = CASES[name][which](stage_dir, n_prompts, prompts)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": peak_mb(), "before_mb": before,
                      "result": result}))


def child(name: str, which: int, stage_dir: Path, n_prompts: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", name, "--which", str(which), "--dir", str(stage_dir),
                          "--prompts", str(n_prompts)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=250_000)
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/generate_bookkeeping"))
    parser.add_argument("--case", help="(internal) run this case in this process")
    parser.add_argument("--which", type=int, help="(internal) 0: the baseline, 1: the code now")
    parser.add_argument("--prompts", type=int, help="(internal) the shards' prompts")
    args = parser.parse_args()
    if args.case:
        return run_case(args.case, args.which, args.dir, args.prompts)
    n_prompts = make_shards(args.dir, args.records, args.replicas)
    size = sum(path.stat().st_size for path in shards.shard_paths(args.dir)) / 2**20
    print(f"{args.records} records ({n_prompts} prompts x {GEN.n}) in {args.replicas} shards, {size:.0f} MiB")
    print("| case | before: s | after: s | before: peak RSS MiB (at start) | after: peak RSS MiB (at start) |")
    print("|---|---:|---:|---:|---:|")
    for name in CASES:
        old, new = (child(name, which, args.dir, n_prompts) for which in (0, 1))
        assert old["result"] == new["result"], (name, old, new)
        print(f"| {name} | {old['seconds']:.2f} | {new['seconds']:.2f} | {old['peak_mb']:.0f} ({old['before_mb']:.0f}) "
              f"| {new['peak_mb']:.0f} ({new['before_mb']:.0f}) |", flush=True)
    same = filecmp.cmp(args.dir / "samples_old.jsonl", args.dir / generate.SAMPLES, shallow=False)
    print(f"samples.jsonl byte-identical to the old merge's: {same}")


if __name__ == "__main__":
    main()
