"""Waits for the slowest rank's long work outlast the process group's timeout (NCCL's is
10 minutes: a replica that finishes its share of generation earlier must not kill the
stage), and ranks that read different inputs fail at once, every one with the same line,
instead of hanging at mismatched collectives or working on other items."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.ledger import read_ledger
from tests.distributed.launch import run_distributed
from tests.fixtures import REPO_ROOT
from tests.synthetic_preferences import preference_records, synthetic_tokenizer
from tests.unit.ppo.tiny_models import write_checkpoints

PG_TIMEOUT_S = 2.0  # the default group's timeout in the in-process worlds


def _world_runtime(world_size: int):
    """A Runtime of the whole world as stage_runtime builds it: the default group and the long-wait group."""
    import torch.distributed as dist

    from offline_rlhf.parallel.dims import ParallelDims
    from offline_rlhf.parallel.distributed import detect_env, device_for, long_wait_group
    from offline_rlhf.parallel.parallelize import build_mesh
    from offline_rlhf.runtime import Runtime

    env = detect_env()
    dims = ParallelDims.build(ParallelConfig(), world_size, None)
    device = device_for(env)
    return Runtime(env=env, device=device, dims=dims, mesh=build_mesh(dims, device), stage_dir=Path("/tmp"),
                   group=dist.group.WORLD, waits=long_wait_group(world_size))


def _late_services(rank, world_size):
    """Rank 0 waits on the PPO services past the default group's timeout; the others wait
    in `from_main` meanwhile, then every rank goes on with collectives of the default group."""
    from offline_rlhf.runtime import any_rank
    from ppo_baseline.stage import count_from_main, from_main

    rt = _world_runtime(world_size)
    polls = []
    if rank == 1:
        time.sleep(2.5 * PG_TIMEOUT_S)  # a replica that finishes its share late
    rt.barrier(poll=(lambda: polls.append(1)) if rank == 0 else None, every=0.5)
    answer = {"scores": torch.tensor([1.0, 2.0]), "values": torch.arange(6.0).view(2, 3)} if rank == 0 else None
    if rank == 0:
        time.sleep(2.5 * PG_TIMEOUT_S)  # a slow service
    got = from_main(answer, {"scores": (2,), "values": (2, 3)}, rt)
    count = count_from_main(7.0 if rank == 0 else None, rt)
    return {"got": got, "count": count, "polls": len(polls), "after": any_rank(rank == 1, rt.device, rt.group)}


def test_waits_for_a_late_rank_outlast_the_process_group_timeout(tmp_path):
    ranks = run_distributed(_late_services, 2, tmp_path, timeout=120.0, pg_timeout=PG_TIMEOUT_S)
    for result in ranks:
        assert torch.equal(result["got"]["values"], torch.arange(6.0).view(2, 3))
        assert result["got"]["scores"].tolist() == [1.0, 2.0] and result["count"] == 7.0 and result["after"]
    assert ranks[0]["polls"] >= 3 and ranks[1]["polls"] == 0  # rank 0 counted (the ledger) while it waited


def _train_on(rank, world_size, items, digests):
    from offline_rlhf.stage_support import TRAINING_DATA
    from offline_rlhf.train.loop import CheckpointSpec, TrainData, train

    rt = _world_runtime(world_size)
    data = TrainData(train=list(range(items[rank])), val=[0, 1], collate=None, seq_len=8)
    spec = CheckpointSpec(root=Path("/nonexistent"), model=None, head="lm", fingerprint={TRAINING_DATA: digests[rank]})
    try:
        train(None, None, data, None, None, None, rt, None, spec)  # fails before it touches any of them
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.parametrize("items, digests, differ", [
    ((2000, 1800), ("aa" * 32, "bb" * 32), "rank 1: training items 1800, validation items 2, sha256 bbbbbbbbbbbb; "
                                            "rank 0: training items 2000, validation items 2, sha256 aaaaaaaaaaaa"),
    ((2000, 2000), ("aa" * 32, "cc" * 32), "rank 1: training items 2000, validation items 2, sha256 cccccccccccc"),
], ids=["other counts", "same counts, other items"])
def test_ranks_that_read_other_training_data_all_fail_naming_them(tmp_path, items, digests, differ):
    """Other counts planned other step counts (a hang at mismatched collectives); the same
    counts of other items trained each rank on its own items, silently."""
    for message in run_distributed(_train_on, 2, tmp_path, items, digests, timeout=120.0):
        assert message is not None and message.startswith("data: rank 1 read other training data than rank 0 (")
        assert differ in message and "every rank must read the same inputs" in message


# End to end: `orlhf generate` as a torchrun world of two replicas.

HOOK = """
import datetime, json, os, sys, time
from pathlib import Path
import offline_rlhf.runtime as runtime
import offline_rlhf.stages.generate as stage
from offline_rlhf.cli import main

import torch.distributed as dist
init = runtime.init_distributed
def init_then_cut_the_timeout(env, *timeout):  # to PG_TIMEOUT_S (NCCL's is 10 minutes), once every rank is in
    device = init(env, *timeout)
    dist.barrier()
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=float(os.environ["PG_TIMEOUT_S"])))
    return device
runtime.init_distributed = init_then_cut_the_timeout
generate_all = stage._generate_all
def slow_replica(*args, **kwargs):  # replica 1 finishes its share well after replica 0
    tokens = generate_all(*args, **kwargs)
    if os.environ["RANK"] == "1":
        time.sleep(float(os.environ["SLOW_S"]))
    return tokens
stage._generate_all = slow_replica
write_outputs = stage.write_outputs
def outputs_after_noting_the_heartbeat(rt, cfg, *args):  # what a kill before the merge would leave
    beat = Path(cfg.run_dir) / ".ledger" / "generate.json"
    (Path(cfg.run_dir) / "beat_before_merge.json").write_text(beat.read_text())
    return write_outputs(rt, cfg, *args)
stage.write_outputs = outputs_after_noting_the_heartbeat
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def generate_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_waits")
    synthetic_tokenizer(root / "tokenizer")
    write_checkpoints(root, root / "tokenizer")
    records = [json.dumps({"prompt": r["prompt"]}) + "\n" for r in preference_records(16)]
    (root / "prompts_0.jsonl").write_text("".join(records))
    (root / "prompts_1.jsonl").write_text("".join(records[:7] + [json.dumps({"prompt": "another"}) + "\n"]
                                                  + records[8:]))  # a copy rewritten since: same count
    (root / "hook.py").write_text(HOOK)
    return root


def torchrun_generate(root: Path, run_dir: Path, prompts: str, env: dict) -> subprocess.CompletedProcess:
    args = ["generate", f"run_dir={run_dir}", f"init.checkpoint={root / 'sft' / 'checkpoints'}",
            f"sources=[{{name: p, kind: prompts, path: '{prompts}'}}]", "generation.max_new_tokens=6",
            "write_every=2"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(root / "hook.py"), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1", "PG_TIMEOUT_S": "6",
                                            "SLOW_S": "0", **env})


def test_a_replica_finishing_long_after_the_other_completes_the_stage_and_its_tokens_count(generate_inputs, tmp_path):
    """Replica 1 ends its share 12 s after replica 0, whose wait at the end-of-work barrier
    (6 s timeout) used to fail the stage; while it waits, rank 0's heartbeat (the ledger row
    of a run killed then) counts replica 1's tokens too, not only its own."""
    run_dir = tmp_path / "run"
    result = torchrun_generate(generate_inputs, run_dir, str(generate_inputs / "prompts_0.jsonl"), {"SLOW_S": "12"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    samples = [json.loads(line) for line in (run_dir / "generate" / "samples.jsonl").read_text().splitlines()]
    total = sum(record["response_tokens"] for record in samples)
    assert len(samples) == 16 and (run_dir / "generate" / "DONE").exists()
    assert json.loads((run_dir / "beat_before_merge.json").read_text())["tokens"] == total
    assert [row.tokens for row in read_ledger(run_dir)] == [total]


def test_replicas_that_read_other_prompts_all_fail_naming_them(generate_inputs, tmp_path):
    """The same count of prompts, one rewritten between the ranks' reads: each replica would
    answer its block of its own list, and the samples would mix answers to other prompts."""
    result = torchrun_generate(generate_inputs, tmp_path / "run", str(generate_inputs / "prompts_${oc.env:RANK}.jsonl"),
                               {})
    assert result.returncode != 0
    lines = re.findall(r"sources: rank 1 read other prompts than rank 0 \(rank 1: prompts 16, sha256 \w{12}; "
                       r"rank 0: prompts 16, sha256 \w{12}\); every rank must read the same inputs", result.stderr)
    assert lines, result.stderr[-3000:]  # each rank's (torchrun may end rank 1 before it prints its own)
    assert not (tmp_path / "run" / "generate" / "samples.jsonl").exists()
