"""Per-token log-likelihoods of labels under logits, written once for every loss.

Labels are aligned with the input tokens (`labels[t]` is token t, or IGNORE_INDEX where
no loss applies); the shift for next-token prediction happens here: logits at t score
labels at t + 1. The losses take these per-token values, never logits, so they stay pure
functions of plain tensors; vocabulary-sharded logits (loss-parallel TP) are turned into
local per-token values by `offline_rlhf.parallel.logprobs.token_nll` at the call site.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offline_rlhf.data.tokenize import IGNORE_INDEX


def shifted_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], labels [B, T] -> (nll [B, T-1], fp32, 0 where ignored; mask [B, T-1] bool)."""
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return nll.view_as(target), target != IGNORE_INDEX
