"""Per-token NLL from logits in any tensor-parallel layout, as plain local tensors."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from offline_rlhf.losses.logprobs import shifted_token_nll


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`shifted_token_nll` for the losses: (nll [B, T-1], mask [B, T-1]). Under loss-parallel
    TP the logits are a vocabulary-sharded DTensor (inside `loss_context`) and the per-token
    losses come back replicated; the losses take their local copy."""
    nll, mask = shifted_token_nll(logits, labels)
    return (nll.to_local() if isinstance(nll, DTensor) else nll), mask
