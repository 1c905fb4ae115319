"""A resume across processes: rank 0 reads the shards once and sends the answered ids; the
other ranks read no shard (each held every record: gigabytes at a million), and fail with
rank 0 when it refuses them."""

from __future__ import annotations

import json

from tests.distributed.launch import run_distributed


def _resume(rank, world_size, stage_dirs, refuse):
    """Rank r resumes from stage_dirs[r]: only rank 0's holds shards."""
    from dataclasses import replace
    from pathlib import Path

    import torch.distributed as dist

    from offline_rlhf.config.errors import ConfigError
    from offline_rlhf.config.schema import ParallelConfig
    from offline_rlhf.generation.shards import resume_shards
    from offline_rlhf.parallel.dims import ParallelDims
    from offline_rlhf.parallel.distributed import detect_env, device_for
    from offline_rlhf.parallel.parallelize import build_mesh
    from tests.fixtures import TINY, runtime_for

    def check(records):
        yield from records
        if refuse:
            raise ConfigError("input", "refused by the stage")

    dims = ParallelDims.build(ParallelConfig(), world_size, TINY)
    rt = replace(runtime_for(dims, build_mesh(dims, device_for(detect_env())), Path(stage_dirs[rank])),
                 group=dist.group.WORLD)
    try:
        return sorted(resume_shards(rt, {"generation.seed": 1}, 2, check=check))
    except ConfigError as failed:
        return str(failed)


def test_rank_0_reads_the_shards_and_every_rank_gets_the_answered_ids(tmp_path):
    shards, empty = tmp_path / "rank0", tmp_path / "rank1"
    shards.mkdir()
    empty.mkdir()
    (shards / "shard_00000.jsonl").write_text("".join(json.dumps({"id": i, "sample": j}) + "\n"
                                                      for i in (4, 0, 9) for j in range(2)) + '{"id": 3, "sa')
    (shards / "shard_00001.jsonl").write_text(json.dumps({"id": 7, "sample": 0}) + "\n")  # incomplete: cut
    assert run_distributed(_resume, 2, tmp_path, [str(shards), str(empty)], False, timeout=120) == [[0, 4, 9]] * 2
    assert not list(empty.iterdir())  # rank 1 neither read nor claimed anything
    assert (shards / "shard_00001.jsonl").read_text() == ""
    refused = run_distributed(_resume, 2, tmp_path, [str(shards), str(empty)], True, timeout=120)
    assert refused == ["input: refused by the stage", "run_dir: rank 0 could not resume the shards (its message "
                                                      "says why)"]
