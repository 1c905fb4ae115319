"""FSDP with bf16 compute (what CUDA runs get): each block's weights are gathered in bf16
while the master weights stay fp32, and a value head still computes in fp32."""

import warnings

import torch
from torch.distributed.tensor import DTensor

from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.data.batching import collate_sequences
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.parallel.parallelize import build_mesh, build_model, fsdp_compute_dtype
from offline_rlhf.parallel.state_dict import load_full_state_dict
from offline_rlhf.runtime import autocast_for
from offline_rlhf.stages.sft import sft_task
from offline_rlhf.train.loop import train_step
from tests.distributed.launch import run_distributed
from tests.fixtures import batch, reference_model, runtime_for, sft_sequences
from tests.unit.train.test_train_invariants import sgd_step


def _bf16_fsdp_copy(reference, world_size):
    dims = ParallelDims.build(ParallelConfig(dp=2), world_size, reference.cfg)
    mesh = build_mesh(dims, torch.device("cpu"))
    model = build_model(reference.cfg, reference.head, dims, mesh, torch.device("cpu"), param_dtype=torch.bfloat16)
    load_full_state_dict(model, reference.state_dict())
    return model, dims, mesh


def _sft_step(rank, world_size):
    model, dims, mesh = _bf16_fsdp_copy(reference_model(), world_size)
    gathered = []
    model.layers[0].attention.wq.register_forward_pre_hook(lambda module, args: gathered.append(module.weight.dtype))
    batches = [collate_sequences([s], pad_id=0) for s in sft_sequences(4)[rank * 2:(rank + 1) * 2]]
    metrics, _ = train_step(sft_task(packed=True), model, torch.optim.SGD(model.parameters(), lr=1.0), batches,
                            runtime_for(dims, mesh), grad_clip=100.0)
    weights = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return metrics, weights, gathered


def test_fsdp_gathers_bf16_weights_and_keeps_fp32_masters_training_like_fp32(tmp_path):
    ref_metrics, ref_weights, _ = sgd_step(sft_sequences(4), micro_batch=1)
    for metrics, weights, gathered in run_distributed(_sft_step, 2, tmp_path):
        assert gathered and set(gathered) == {torch.bfloat16}  # the block computed with bf16 weights
        assert abs(metrics["loss"] - ref_metrics["loss"]) < 0.05
        assert abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) / ref_metrics["grad_norm"] < 0.02
        for name, weight in ref_weights.items():
            assert weights[name].dtype == torch.float32, name
            torch.testing.assert_close(weights[name], weight, atol=0.02, rtol=0.02, msg=name)


def _rewards(rank, world_size):
    model, _, _ = _bf16_fsdp_copy(reference_model(head="value"), world_size)
    rewards = model(batch(size=4, seq=16))
    rewards.sum().backward()  # through the head's own FSDP unit into the bf16 blocks
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    return rewards.detach(), grads


def test_a_value_head_under_bf16_fsdp_gives_fp32_rewards_not_bf16_rounded_ones(tmp_path):
    reference = reference_model(head="value")
    exact = reference(batch(size=4, seq=16))
    exact.sum().backward()
    for rewards, grads in run_distributed(_rewards, 2, tmp_path):
        rewards = rewards.full_tensor() if isinstance(rewards, DTensor) else rewards
        assert rewards.dtype == torch.float32
        assert not torch.equal(rewards, rewards.to(torch.bfloat16).float())  # not rounded to bf16
        torch.testing.assert_close(rewards, exact.detach(), atol=0.05, rtol=0.05)
        for name, param in reference.named_parameters():
            assert grads[name].dtype == torch.float32, name
            assert (grads[name] - param.grad).abs().max() <= 0.02 * param.grad.abs().max(), name  # bf16's error


def test_cuda_runs_compute_in_bf16_without_autocasts_weight_cache():
    assert fsdp_compute_dtype(torch.device("cuda")) == torch.bfloat16
    assert fsdp_compute_dtype(torch.device("cpu")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the context is only inspected
        context = autocast_for(torch.device("cuda"))
    assert context.fast_dtype == torch.bfloat16 and context._cache_enabled is False
