"""The PPO actor's entropy metric and the no-grad log-prob scoring (the reference service,
the actor's old log-probs) build their fp32 [T, V] tensors a row at a time, never the
batch's [B, T, V] (8 to 16 GB each at T=2048, V=128k), with the numbers the whole-batch
formulas give."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.parallel.dims import ParallelDims
from ppo_baseline.models import response_logprobs, sequence_logprobs, token_entropy
from tests.fixtures import TINY, runtime_for

B, T, V = 5, 12, 300


class LargestFloat32(TorchDispatchMode):
    """The most elements of any fp32 tensor an op allocated (views aside) inside the mode."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                    self.numel = max(self.numel, tensor.numel())
        return out


def rows(seed: int = 0):
    """bf16 logits [B, T, V] as a model under autocast returns them, tokens, a response mask."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=generator) * 4).bfloat16()
    tokens = torch.randint(0, V, (B, T), generator=generator)
    mask = torch.arange(T) >= torch.tensor([[2], [3], [5], [1], [7]])
    return logits, tokens, mask


def whole_batch_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """token_entropy as it was: the whole batch's log-softmax at once."""
    logp = logits[:, :-1].float().log_softmax(-1)
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out[:, 1:] = -(logp.exp() * logp).sum(-1)
    return torch.where(mask, out, 0.0)


def test_entropy_takes_a_row_at_a_time_with_the_same_numbers():
    logits, _, mask = rows()
    with LargestFloat32() as seen:
        entropy = token_entropy(logits, mask)
    assert torch.equal(entropy, whole_batch_entropy(logits, mask))
    assert entropy[mask].min() > 0 and not entropy[~mask].any()
    assert seen.numel <= T * V  # a row's, not the batch's B * (T - 1) * V


class TokenLogits(nn.Module):
    """A language model whose bf16 logits at t depend on token t alone (one lookup)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(V, V, dtype=torch.bfloat16)
        nn.init.normal_(self.table.weight, std=4.0, generator=torch.Generator().manual_seed(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens)


@pytest.mark.parametrize("batch_size", [2, 16])
def test_scoring_log_probs_take_a_row_at_a_time_with_the_same_numbers(batch_size, tmp_path):
    _, tokens, mask = rows()
    model = TokenLogits()
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None, tmp_path)
    lengths = torch.full((B,), T)
    with LargestFloat32() as seen:
        scored = response_logprobs(model, {"tokens": tokens, "mask": mask, "lengths": lengths}, rt, batch_size)
    with torch.no_grad():
        whole = sequence_logprobs(model(tokens), tokens, mask)  # the training path: the batch at once
    assert torch.equal(scored, whole)
    assert scored[mask].max() < 0 and not scored[~mask].any()
    assert seen.numel <= T * V  # a row's fp32 logits and log-softmax, not min(batch_size, B) rows'
