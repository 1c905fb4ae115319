"""The training step under DP=2 (FSDP2) and TP=2 equals one process on the same global batch."""

from dataclasses import replace

import pytest
import torch
from torch.distributed.tensor import DTensor

from offline_rlhf.data.batching import collate_sequences
from offline_rlhf.parallel import logprobs
from offline_rlhf.stages.sft import sft_task
from offline_rlhf.train.loop import train_step
from tests.distributed.launch import run_distributed
from tests.fixtures import TINY, parallel_copy, reference_model, runtime_for, sft_sequences
from tests.unit.train.test_learned_nothing import overflowing
from tests.unit.train.test_train_invariants import sgd_step

# Qwen3's per-head q/k norms, with heads wider than dim / n_heads.
QK_NORM = replace(TINY, qk_norm=True, head_dim=32)


def _parallel_step(rank, world_size, parallel, cfg=TINY, count=4):
    model, dims, mesh = parallel_copy(reference_model(cfg), world_size, **parallel)
    rt = runtime_for(dims, mesh)
    sequences = sft_sequences(count)
    dp_rank = mesh.get_local_rank("dp")
    mine = sequences[dp_rank * count // dims.dp:(dp_rank + 1) * count // dims.dp]
    multiple = dims.tp if dims.sequence_parallel else 1
    batches = [collate_sequences([s], pad_id=0, multiple_of=multiple) for s in mine]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics, tokens = train_step(sft_task(packed=True), model, optimizer, batches, rt, grad_clip=100.0)
    weights = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
               for n, p in model.named_parameters()}
    return metrics, weights, tokens


@pytest.mark.parametrize("parallel", [dict(dp=2), dict(tp=2), dict(tp=2, sequence_parallel=True),
                                      dict(tp=2, sequence_parallel=True, loss_parallel=True)],
                         ids=["dp2_fsdp", "tp2", "tp2_sp", "tp2_sp_loss_parallel"])
def test_train_step_matches_single_process(tmp_path, parallel):
    ref_metrics, ref_weights, ref_tokens = sgd_step(sft_sequences(4), micro_batch=1)
    for metrics, weights, tokens in run_distributed(_parallel_step, 2, tmp_path, parallel):
        assert abs(metrics["loss"] - ref_metrics["loss"]) < 1e-5
        assert abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) < 1e-4
        assert tokens == ref_tokens
        for name, weight in ref_weights.items():
            torch.testing.assert_close(weights[name], weight, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("parallel", [dict(tp=2, compile=True), dict(tp=2, sequence_parallel=True, compile=True)],
                         ids=["tp2", "tp2_sp"])
def test_compiled_blocks_under_tensor_parallelism_train_as_one_process(tmp_path, parallel):
    """Two micro-batches of different lengths (23 and 19 tokens): the second compiles the
    blocks again. Was: backward failed on the embedding's lazily waited all-reduce, then the
    recompile for a new length recursed without end (torch 2.13)."""
    ref_metrics, ref_weights, _ = sgd_step(sft_sequences(2), micro_batch=1)
    for metrics, weights, _ in run_distributed(_parallel_step, 2, tmp_path, parallel, TINY, 2):
        assert abs(metrics["loss"] - ref_metrics["loss"]) < 1e-5
        assert abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) < 1e-4
        for name, weight in ref_weights.items():
            torch.testing.assert_close(weights[name], weight, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("parallel,world", [(dict(tp=2), 2), (dict(tp=2, sequence_parallel=True), 2),
                                            (dict(tp=2, dp=2), 4)], ids=["tp2", "tp2_sp", "tp2_dp2_fsdp"])
def test_a_qk_norm_model_trains_under_tensor_parallelism_as_in_one_process(tmp_path, parallel, world):
    """Each TP rank normalizes its own heads with the shared q/k norm weights: its gradient of
    them is a partial sum, which the ranks add up (unsummed, the norms' updates were wrong
    and the ranks' copies of them drifted apart)."""
    ref_metrics, ref_weights, _ = sgd_step(sft_sequences(4), micro_batch=1, model=reference_model(QK_NORM))
    for metrics, weights, _ in run_distributed(_parallel_step, world, tmp_path, parallel, QK_NORM):
        assert abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) < 1e-4
        for name, weight in ref_weights.items():
            torch.testing.assert_close(weights[name], weight, atol=2e-6, rtol=1e-5, msg=name)


def _chunked_parallel_step(rank, world_size, parallel, logits_per_chunk):
    logprobs.LOGITS_PER_CHUNK = logits_per_chunk  # this rank's own module (set where it runs: forked or spawned)
    return _parallel_step(rank, world_size, parallel)


@pytest.mark.parametrize("dp_mode", ["fsdp", "ddp"])
def test_the_chunked_lm_head_trains_under_data_parallelism_as_the_whole_logits(tmp_path, dp_mode):
    """Three labelled tokens per chunk, each chunk's logits recomputed in the backward, inside
    the FSDP root's forward (where its head weight is gathered) or under DDP: the step of one
    process with the whole [B, T, V] logits."""
    ref_metrics, ref_weights, _ = sgd_step(sft_sequences(4), micro_batch=1)
    results = run_distributed(_chunked_parallel_step, 2, tmp_path, dict(dp=2, dp_mode=dp_mode), 3 * TINY.vocab_size)
    for metrics, weights, _ in results:
        assert abs(metrics["loss"] - ref_metrics["loss"]) < 1e-5
        assert abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) < 1e-4
        for name, weight in ref_weights.items():
            torch.testing.assert_close(weights[name], weight, atol=2e-6, rtol=1e-5, msg=name)


def _step_with_rank_1_overflowing(rank, world_size):
    model, dims, mesh = parallel_copy(reference_model(), world_size, dp=2)
    before = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    batches = [collate_sequences([sft_sequences(2)[mesh.get_local_rank("dp")]], pad_id=0)]
    task = overflowing(sft_task(packed=True), mesh.get_local_rank("dp"), of_rank=1)
    metrics, _ = train_step(task, model, torch.optim.SGD(model.parameters(), lr=1.0), batches, runtime_for(dims, mesh),
                            grad_clip=100.0)
    unchanged = all(torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters())
    return metrics["skipped_step"], unchanged


def test_a_loss_that_is_not_finite_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """The step decision reads the loss reduced over the data-parallel group: decided by
    its own loss, rank 0 would step while rank 1 skipped, and the replicas would part."""
    assert run_distributed(_step_with_rank_1_overflowing, 2, tmp_path) == [(1.0, True)] * 2
