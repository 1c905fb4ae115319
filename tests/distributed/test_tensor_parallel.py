"""TP=2 (with and without sequence parallelism) against the same weights in one process."""

import pytest
import torch
from torch.distributed.tensor import DTensor

from offline_rlhf.parallel.grad import clip_grad_norm_
from tests.distributed.launch import run_distributed
from tests.fixtures import batch, parallel_copy, reference_model


def _full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _logits_and_grads(rank, world_size, sequence_parallel, head):
    model, _, _ = parallel_copy(reference_model(head=head), world_size, tp=2, sequence_parallel=sequence_parallel)
    out = model(batch())
    out.float().pow(2).mean().backward()
    grads = {name: _full(p.grad).detach().clone() for name, p in model.named_parameters()}
    norm = clip_grad_norm_(model.parameters(), max_norm=1e-3)
    return {"out": _full(out).detach(), "grads": grads, "norm": norm}


def _reference(head):
    model = reference_model(head=head)
    out = model(batch())
    out.float().pow(2).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    return out.detach(), grads, norm


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
@pytest.mark.parametrize("head", ["lm", "value"])
def test_tp2_matches_single_process(tmp_path, sequence_parallel, head):
    results = run_distributed(_logits_and_grads, 2, tmp_path, sequence_parallel, head)
    ref_out, ref_grads, ref_norm = _reference(head)
    for result in results:
        torch.testing.assert_close(result["out"], ref_out, atol=1e-5, rtol=1e-5)
        assert result["grads"].keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(result["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)
        # Mixed DTensor (sharded projections) and plain (norm weights without SP) gradients.
        torch.testing.assert_close(result["norm"], ref_norm, atol=1e-6, rtol=1e-5)


def _cross_entropy_and_grads(rank, world_size, parallel):
    from offline_rlhf.parallel.parallelize import loss_context

    model, dims, _ = parallel_copy(reference_model(), world_size, **parallel)
    tokens = batch(seq=17)
    with loss_context(dims):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
    grads = {name: _full(p.grad).detach().clone() for name, p in model.named_parameters()}
    return {"loss": _full(loss).detach(), "sharded_logits": isinstance(logits, DTensor), "grads": grads}


@pytest.mark.parametrize("parallel", [dict(tp=2, loss_parallel=True, sequence_parallel=True),
                                      dict(tp=2, activation_checkpointing=True)],
                         ids=["loss_parallel_sp", "activation_checkpointing"])
def test_loss_parallel_and_activation_checkpointing_match_single_process(tmp_path, parallel):
    reference = reference_model()
    tokens = batch(seq=17)
    ref_loss = torch.nn.functional.cross_entropy(reference(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    ref_loss.backward()
    for result in run_distributed(_cross_entropy_and_grads, 2, tmp_path, parallel):
        assert result["sharded_logits"] == parallel.get("loss_parallel", False)
        torch.testing.assert_close(result["loss"], ref_loss.detach(), atol=1e-6, rtol=1e-6)
        for name, param in reference.named_parameters():
            torch.testing.assert_close(result["grads"][name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


def _initialized(rank, world_size, parallel):
    """A model initialized from a seed (random weights, as `orlhf sft` without an init
    checkpoint starts), gathered whole."""
    from offline_rlhf.config.schema import ParallelConfig
    from offline_rlhf.parallel.dims import ParallelDims
    from offline_rlhf.parallel.distributed import detect_env, device_for
    from offline_rlhf.parallel.parallelize import build_mesh, build_model
    from tests.fixtures import TINY

    dims = ParallelDims.build(ParallelConfig(**parallel), world_size, TINY)
    device = device_for(detect_env())
    model = build_model(TINY, "lm", dims, build_mesh(dims, device), device, seed=7)
    return {name: _full(param).detach().clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("parallel", [{"tp": 2}, {"tp": 1}], ids=["tp2", "dp2"])
def test_a_model_initialized_from_a_seed_is_the_same_under_any_layout(tmp_path, parallel):
    [one] = run_distributed(_initialized, 1, tmp_path / "one", {})
    for result in run_distributed(_initialized, 2, tmp_path / "two", parallel):
        assert result.keys() == one.keys()
        for name, param in one.items():
            torch.testing.assert_close(result[name], param, atol=0, rtol=0, msg=name)
