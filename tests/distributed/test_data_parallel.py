"""DP=2 (FSDP2 or DDP) on two halves of a batch equals one process on the whole batch."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from offline_rlhf.parallel.grad import clip_grad_norm_
from tests.distributed.launch import run_distributed
from tests.fixtures import TINY, TINY_TIED, batch, parallel_copy, reference_model


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _dp_step(rank, world_size, parallel, cfg):
    model, dims, _ = parallel_copy(reference_model(cfg), world_size, **parallel)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # Adam would amplify rounding in near-zero grads
    tokens = batch(size=8, seq=17).chunk(dims.dp)[rank // dims.tp]
    _loss(model, tokens).backward()
    norm = clip_grad_norm_(model.parameters(), max_norm=0.5)
    optimizer.step()
    weights = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
               for n, p in model.named_parameters()}
    assert not cfg.tie_embeddings or model.output.weight is model.tok_embeddings.weight
    return {"norm": norm, "weights": weights}


def _reference_step(cfg):
    model = reference_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # Adam would amplify rounding in near-zero grads
    _loss(model, batch(size=8, seq=17)).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
    optimizer.step()
    return norm, dict(model.named_parameters())


@pytest.mark.parametrize("parallel,world_size,cfg", [
    (dict(dp=2), 2, TINY),
    (dict(dp=2, dp_mode="ddp"), 2, TINY),
    (dict(tp=2, dp=2, sequence_parallel=True), 4, TINY),
    (dict(dp=2), 2, TINY_TIED),
    (dict(tp=2), 2, TINY_TIED),
], ids=["fsdp2", "ddp", "tp2xdp2_sp", "fsdp2_tied", "tp2_tied"])
def test_data_parallel_matches_full_batch(tmp_path, parallel, world_size, cfg):
    ref_norm, ref_weights = _reference_step(cfg)
    for result in run_distributed(_dp_step, world_size, tmp_path, parallel, cfg):
        torch.testing.assert_close(result["norm"], ref_norm, atol=1e-6, rtol=1e-5)
        for name, weight in ref_weights.items():
            torch.testing.assert_close(result["weights"][name], weight.detach(), atol=1e-6, rtol=1e-5, msg=name)
