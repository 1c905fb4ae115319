"""Generation across processes: TP=1 replicas over disjoint prompt shards reproduce one
process's output; TP=2 decodes the same tokens as TP=1, identically on both ranks."""

from __future__ import annotations

import torch

from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.generation.engine import generate, prefill_mask
from offline_rlhf.generation.kv_cache import new_cache
from offline_rlhf.generation.shards import FINGERPRINT, shard_indices
from tests.distributed.launch import run_distributed
from tests.fixtures import parallel_copy, reference_model
from tests.unit.generation.test_engine import NEW_TOKENS, PAD, prompts_of_lengths

PROMPTS = prompts_of_lengths([3, 9, 1, 6, 14, 2, 5])
GREEDY = GenerationConfig(NEW_TOKENS, batch_size=3)
SAMPLED = GenerationConfig(NEW_TOKENS, greedy=False, top_k=40, top_p=0.9, seed=5, batch_size=3)


def _replica_shard(rank, world_size):
    indices = shard_indices(len(PROMPTS), rank, world_size)
    outputs = generate(reference_model().eval(), [PROMPTS[i] for i in indices], GREEDY, None, PAD, "cpu")
    return dict(zip(indices, outputs))


def _tensor_parallel(rank, world_size):
    model, _, _ = parallel_copy(reference_model(), world_size, tp=2)
    model.eval()
    outputs = {name: generate(model, PROMPTS, cfg, None, PAD, "cpu") for name, cfg in
               (("greedy", GREEDY), ("sampled", SAMPLED))}
    cache = new_cache(len(model.layers), 1, 8)
    with torch.inference_mode():
        model(torch.tensor([[1, 2]]), None, prefill_mask(torch.ones(1, 2, dtype=torch.bool)), cache=cache)
    return {**outputs, "cached_kv_heads": cache[0].k.shape[1]}


def test_replicas_cover_each_prompt_once(tmp_path):
    shards = run_distributed(_replica_shard, 2, tmp_path)
    assert not shards[0].keys() & shards[1].keys()
    merged = {**shards[0], **shards[1]}
    single = generate(reference_model().eval(), PROMPTS, GREEDY, None, PAD, "cpu")
    assert [merged[i] for i in range(len(PROMPTS))] == single


def test_tp2_generates_what_tp1_does(tmp_path):
    ranks = run_distributed(_tensor_parallel, 2, tmp_path)
    assert ranks[0] == ranks[1]  # same seed, same all-gathered logits: the ranks never diverge
    assert ranks[0]["cached_kv_heads"] == reference_model().cfg.n_kv_heads // 2  # each rank caches its shard
    assert ranks[0]["greedy"] == generate(reference_model().eval(), PROMPTS, GREEDY, None, PAD, "cpu")


def _resume_refused(rank, world_size, stage_dir):
    """Shards written under another config: rank 0 refuses them; every rank must fail."""
    from dataclasses import replace
    from pathlib import Path

    import torch.distributed as dist

    from offline_rlhf.config.schema import ParallelConfig
    from offline_rlhf.generation.shards import resume_shards
    from offline_rlhf.parallel.dims import ParallelDims
    from offline_rlhf.parallel.distributed import detect_env, device_for
    from offline_rlhf.parallel.parallelize import build_mesh
    from tests.fixtures import TINY, runtime_for

    dims = ParallelDims.build(ParallelConfig(), world_size, TINY)
    rt = replace(runtime_for(dims, build_mesh(dims, device_for(detect_env())), Path(stage_dir)),
                 group=dist.group.WORLD)
    try:
        resume_shards(rt, {"generation.seed": 2}, 1)
    except Exception as failed:  # noqa: BLE001 (the test reports what each rank raised)
        return f"{type(failed).__name__}: {failed}"
    return ""


def test_a_refused_resume_fails_every_replica_instead_of_leaving_them_at_a_barrier(tmp_path):
    import json

    stage_dir = tmp_path / "generate"
    stage_dir.mkdir()
    (stage_dir / "shard_00000.jsonl").write_text(json.dumps({"id": 0, "sample": 0}) + "\n")
    (stage_dir / FINGERPRINT).write_text(json.dumps({"generation.seed": 1}))
    rank0, rank1 = run_distributed(_resume_refused, 2, tmp_path, str(stage_dir), timeout=120)
    assert rank0.startswith("ResumeRefused: generation.seed: differs from the run that wrote")
    assert rank1 == "ConfigError: run_dir: rank 0 could not resume the shards (its message says why)"
