"""Supervised fine-tuning loss (paper Eq. 1)."""

from __future__ import annotations

import torch

from offline_rlhf.losses.logprobs import shifted_token_nll


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer: float) -> tuple[torch.Tensor, dict]:
    """Eq. 1: L = -sum_i log p(x_i | x_<i, prompt) over response tokens, divided by
    `normalizer` = the number of response tokens in the whole global batch (all
    micro-batches, all data-parallel ranks), so accumulation and DP size leave it unchanged.
    Returns (loss, metric sums): the loop divides sums by the global normalizer."""
    nll, _ = shifted_token_nll(logits, labels)
    total = nll.sum()
    return total / normalizer, {"loss": total.detach()}
