"""Collate packed (or one-document) sequences into padded tensors."""

from __future__ import annotations

from typing import Sequence

import torch

from offline_rlhf.data.packing import PackedSequence
from offline_rlhf.data.tokenize import IGNORE_INDEX

PAD_DOCUMENT = -1


def collate_sequences(sequences: Sequence[PackedSequence], pad_id: int,
                      multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence, rounded up to `multiple_of` (sequence parallelism
    needs the length divisible by TP). Padding: pad_id tokens, ignored labels, position 0,
    its own document id."""
    longest = max(len(s.input_ids) for s in sequences)
    length = -(-longest // multiple_of) * multiple_of

    def padded(values, fill):
        return torch.tensor([list(v) + [fill] * (length - len(v)) for v in values], dtype=torch.long)

    return {
        "tokens": padded((s.input_ids for s in sequences), pad_id),
        "labels": padded((s.labels for s in sequences), IGNORE_INDEX),
        "positions": padded((s.positions for s in sequences), 0),
        "document_ids": padded((s.document_ids for s in sequences), PAD_DOCUMENT),
    }


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["document_ids"] != PAD_DOCUMENT).sum())


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are predicted (labels shifted by one, as in the loss)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
