"""Supervised fine-tuning loss (paper Eq. 1)."""

from __future__ import annotations

import torch


def sft_loss(nll: torch.Tensor, mask: torch.Tensor, normalizer: float) -> tuple[torch.Tensor, dict]:
    """Eq. 1: L = -sum_i log p(x_i | x_<i, prompt) over response tokens, divided by
    `normalizer` = the number of response tokens in the whole global batch (all
    micro-batches, all data-parallel ranks), so accumulation and DP size leave it unchanged.
    nll, mask: [B, T-1] per-token NLL (0 where ignored) and trained-token mask (`token_nll`).
    Returns (loss, metric sums): the loop divides sums by the global normalizer."""
    total = (nll * mask).sum()
    return total / normalizer, {"loss": total.detach()}
