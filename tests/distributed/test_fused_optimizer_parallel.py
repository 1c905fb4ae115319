"""build_optimizer's fused AdamW (what CUDA runs; CPU has the same fused kernel) steps a
tensor-parallel model whose parameters are partly DTensors, partly plain tensors (the norms
without sequence parallelism, the value head, Qwen3's q/k norms), as one process does."""

from dataclasses import replace

import pytest
import torch
from torch.distributed.tensor import DTensor

from offline_rlhf.config.schema import OptimConfig
from offline_rlhf.parallel.grad import sum_head_norm_grads
from offline_rlhf.train.schedule import build_optimizer
from tests.distributed.launch import run_distributed
from tests.fixtures import TINY, batch, parallel_copy, reference_model

# Sharded qkv biases beside plain norms in the undecayed group; Qwen3's q/k norms.
CFG = replace(TINY, qkv_bias=True, qk_norm=True, head_dim=32)
# eps of the gradients' size: Adam's first step is then no sign function of near-zero gradients.
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, eps=1e-3)


def _full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _step(model):
    optimizer = build_optimizer(model.parameters(), OPTIM, torch.device("cpu"), fused=True)
    _full(model(batch(CFG))).float().pow(2).mean().backward()
    sum_head_norm_grads(model)  # as the training loop does
    optimizer.step()
    kinds = {isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"]}
    return len(optimizer.param_groups), kinds, {n: _full(p).detach().clone() for n, p in model.named_parameters()}


def _parallel_step(rank, world_size, head, parallel):
    return _step(parallel_copy(reference_model(CFG, head), world_size, **parallel)[0])


@pytest.mark.parametrize("head,parallel", [("lm", dict(tp=2)), ("value", dict(tp=2)),
                                           ("value", dict(tp=2, sequence_parallel=True))],
                         ids=["lm_tp2", "value_tp2", "value_tp2_sp"])
def test_fused_adamw_steps_mixed_dtensor_and_plain_parameters_as_one_process(tmp_path, head, parallel):
    groups, _, expected = _step(reference_model(CFG, head))
    assert groups == 2
    initial = reference_model(CFG, head).state_dict()
    assert all((expected[name] - initial[name]).abs().max() > 1e-4 for name in expected)  # each one stepped
    for parallel_groups, kinds, weights in run_distributed(_parallel_step, 2, tmp_path, head, parallel):
        assert kinds == {True, False}  # the mixed layout the fused kernel refused
        assert parallel_groups == groups  # the groups schedulers and checkpoints see do not depend on the layout
        for name, weight in expected.items():
            torch.testing.assert_close(weights[name], weight, atol=2e-6, rtol=1e-5, msg=name)
