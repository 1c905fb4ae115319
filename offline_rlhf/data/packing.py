"""Tokenized documents to training sequences, packed or one per sequence (no torch here).

Every sequence carries `positions` (restarting at 0 for each document, for rotary
embeddings) and `document_ids` (0, 1, 2... within the sequence, for a block-diagonal
attention mask), so a packed batch gives exactly the loss of the unpacked one.
Padding is the collate function's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from offline_rlhf.data.tokenize import IGNORE_INDEX, TokenizedSample


@dataclass(frozen=True)
class PackedSequence:
    """Tuples of one length: token ids, labels aligned with them, per-document
    positions and per-document ids."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    positions: tuple[int, ...]
    document_ids: tuple[int, ...]

    def __post_init__(self):
        lengths = {len(self.input_ids), len(self.labels), len(self.positions), len(self.document_ids)}
        if len(lengths) != 1:
            raise ValueError(f"expected fields of one length, got lengths {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_documents(self) -> int:
        return self.document_ids[-1] + 1 if self.document_ids else 0


def _concat(documents: Sequence[TokenizedSample]) -> PackedSequence:
    input_ids, labels, positions, document_ids = [], [], [], []
    for index, document in enumerate(documents):
        input_ids.extend(document.input_ids)
        labels.extend(document.labels)
        positions.extend(range(len(document)))
        document_ids.extend([index] * len(document))
    return PackedSequence(tuple(input_ids), tuple(labels), tuple(positions), tuple(document_ids))


def _check_packable(sample: TokenizedSample, seq_len: int) -> None:
    """A sample must fit a sequence and must not train on its first token.

    The loss scores labels[t + 1] with the logits at t; in a packed sequence the
    token before a document's first one is the previous document's last, so a
    trained first label would be predicted across the document boundary.
    """
    if not 0 < len(sample) <= seq_len:
        raise ValueError(f"{sample.source}: {len(sample)} tokens do not fit seq_len={seq_len} (truncate first)")
    if sample.labels[0] != IGNORE_INDEX:
        raise ValueError(f"{sample.source}: first label is trained on; packing would predict it from another document")


def pack_samples(samples: Sequence[TokenizedSample], seq_len: int) -> list[PackedSequence]:
    """Greedy packing in order: a sample joins the current sequence when it fits,
    else starts a new one. Samples are never split or reordered, so the result is
    deterministic and every sample appears exactly once."""
    groups: list[list[TokenizedSample]] = []
    used = seq_len  # forces a new sequence for the first sample
    for sample in samples:
        _check_packable(sample, seq_len)
        if used + len(sample) > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(sample)
        used += len(sample)
    return [_concat(group) for group in groups]


def unpacked(samples: Sequence[TokenizedSample]) -> list[PackedSequence]:
    """One document per sequence, in the same format as `pack_samples`."""
    return [_concat([sample]) for sample in samples]
