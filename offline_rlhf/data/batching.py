"""Collate packed (or one-document) sequences into padded tensors."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from offline_rlhf.data.packing import PackedSequence
from offline_rlhf.data.tokenize import IGNORE_INDEX, TokenIds

PAD_DOCUMENT = -1


def collate_sequences(sequences: Sequence[PackedSequence], pad_id: int, multiple_of: int = 1,
                      length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence, rounded up to `multiple_of` (sequence parallelism
    needs the length divisible by TP), or to `length` when given (no row may be longer).
    Padding: pad_id tokens, ignored labels, position 0, its own document id. Rows are copied
    from the token buffers, positions and document ids computed from the document lengths
    (numpy: no Python int per token)."""
    longest = max(len(s.input_ids) for s in sequences)
    if length is None:
        length = -(-longest // multiple_of) * multiple_of
    elif longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit the fixed length {length}")
    shape = (len(sequences), length)
    tokens, labels = np.full(shape, pad_id, dtype=np.int64), np.full(shape, IGNORE_INDEX, dtype=np.int64)
    positions, document_ids = np.zeros(shape, dtype=np.int64), np.full(shape, PAD_DOCUMENT, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        size = len(sequence.input_ids)
        tokens[row, :size] = np.frombuffer(sequence.input_ids, dtype=_C_INT)
        labels[row, :size] = np.frombuffer(sequence.labels, dtype=_C_INT)
        lengths = np.array(sequence.document_lengths, dtype=np.int64)
        document_ids[row, :size] = np.repeat(np.arange(len(lengths)), lengths)
        positions[row, :size] = np.arange(size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "positions": torch.from_numpy(positions), "document_ids": torch.from_numpy(document_ids)}


_C_INT = np.dtype(f"i{TokenIds().itemsize}")  # TokenIds' ints, in the machine's byte order


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["document_ids"] != PAD_DOCUMENT).sum())


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are predicted (labels shifted by one, as in the loss)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
