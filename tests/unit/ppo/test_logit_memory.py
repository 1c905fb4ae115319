"""The PPO actor's log-probs and entropy metric and the no-grad log-prob scoring (the
reference service, the actor's old log-probs) run the LM head at action positions only, a
row's chunk at a time: their largest fp32 tensor is a row's [T, V], never the batch's
[B, T, V] (8 to 16 GB each at T=2048, V=128k), with the numbers the whole logits give."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.parallel.dims import ParallelDims
from ppo_baseline.models import action_scores, response_logprobs
from tests.fixtures import TINY, reference_model, runtime_for

B, T, V = 5, 12, 2048
# A vocabulary large next to the width, so a row's logits outnumber every activation.
WIDE_VOCAB = replace(TINY, vocab_size=V, dim=32)


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
    """Tokens [B, T] and a response mask starting at a different position in each row."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=generator)
    mask = torch.arange(T) >= torch.tensor([[2], [3], [5], [1], [7]])
    return tokens, mask


def whole_logits_scores(model, tokens, mask):
    """Log-probs and entropy from the whole batch's log-softmax at once, as they were computed."""
    logp = model(tokens)[:, :-1].float().log_softmax(-1)
    out = torch.zeros(B, T), torch.zeros(B, T)
    out[0][:, 1:] = logp.gather(2, tokens[:, 1:, None])[..., 0]
    out[1][:, 1:] = -(logp.exp() * logp).sum(-1).detach()
    return tuple(torch.where(mask, value, 0.0) for value in out)


def test_action_log_probs_entropy_and_gradients_equal_the_whole_logits():
    tokens, mask = rows()
    results = []
    for scores in (whole_logits_scores, lambda m, t, k: action_scores(m, t, k, entropy=True)):
        model = reference_model(WIDE_VOCAB)
        logp, entropy = scores(model, tokens, mask)
        (logp * torch.linspace(0.5, 2.0, B * T).view(B, T)).sum().backward()  # per-token weights, as advantages
        results.append((logp.detach(), entropy, {name: p.grad for name, p in model.named_parameters()}))
    (want_logp, want_entropy, want_grads), (logp, entropy, grads) = results
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)
    assert logp[mask].max() < 0 and not logp[~mask].any() and entropy[mask].min() > 0 and not entropy[~mask].any()
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_actors_loss_forward_builds_a_rows_logits_at_most():
    tokens, mask = rows()
    model = reference_model(WIDE_VOCAB)
    with LargestFloat32() as seen:
        action_scores(model, tokens, mask, entropy=True)
    assert seen.numel <= T * V  # a row's, not the batch's B * (T - 1) * V


@pytest.mark.parametrize("batch_size", [2, 16])
def test_scoring_log_probs_take_a_row_at_a_time_with_the_same_numbers(batch_size, tmp_path):
    tokens, mask = rows()
    model = reference_model(WIDE_VOCAB)
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, WIDE_VOCAB), None, tmp_path)
    lengths = torch.full((B,), T)
    with LargestFloat32() as seen:
        scored = response_logprobs(model, {"tokens": tokens, "mask": mask, "lengths": lengths}, rt, batch_size)
    with torch.no_grad():
        whole, _ = whole_logits_scores(model, tokens, mask)
    torch.testing.assert_close(scored, whole, atol=1e-5, rtol=1e-5)
    assert scored[mask].max() < 0 and not scored[~mask].any()
    assert seen.numel <= T * V  # a row's fp32 logits and log-softmax, not min(batch_size, B) rows'
