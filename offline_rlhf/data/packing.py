"""Tokenized documents to training sequences, packed or one per sequence (no torch here).

Every sequence has `positions` (restarting at 0 for each document, for rotary
embeddings) and `document_ids` (0, 1, 2... within the sequence, for a block-diagonal
attention mask), so a packed batch gives exactly the loss of the unpacked one. Both are
derived from the documents' lengths, which is all a sequence stores of them.
Padding is the collate function's job.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, repeat

from offline_rlhf.data.tokenize import IGNORE_INDEX, TokenIds, TokenizedSample


@dataclass(frozen=True, slots=True)
class PackedSequence:
    """Token ids and the labels aligned with them (`TokenIds`; any sequence of ints is
    stored as one), and the lengths of the documents they concatenate, in order."""

    input_ids: TokenIds
    labels: TokenIds
    document_lengths: tuple[int, ...]

    def __post_init__(self):
        for name in ("input_ids", "labels"):
            if not isinstance(getattr(self, name), TokenIds):
                object.__setattr__(self, name, TokenIds(getattr(self, name)))
        object.__setattr__(self, "document_lengths", tuple(map(int, self.document_lengths)))
        if any(length < 0 for length in self.document_lengths):
            raise ValueError(f"expected document lengths of at least 0, got {self.document_lengths}")
        lengths = {len(self.input_ids), len(self.labels), sum(self.document_lengths)}
        if len(lengths) != 1:
            raise ValueError(f"expected fields of one length, got lengths {sorted(lengths)} (input_ids, labels, "
                             "documents)")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def positions(self) -> TokenIds:
        """Each token's position in its document (computed on each call)."""
        return TokenIds(chain.from_iterable(map(range, self.document_lengths)))

    @property
    def document_ids(self) -> TokenIds:
        """Each token's document: 0, 1, 2... in order (computed on each call)."""
        return TokenIds(chain.from_iterable(map(repeat, range(len(self.document_lengths)), self.document_lengths)))

    @property
    def num_documents(self) -> int:
        """The last document id + 1 (0 without tokens; a trailing empty document has no id)."""
        return next((index + 1 for index in reversed(range(len(self.document_lengths)))
                     if self.document_lengths[index]), 0)


def _concat(documents: Sequence[TokenizedSample]) -> PackedSequence:
    if len(documents) == 1:  # the sample's own (read-only) fields, not a copy
        return PackedSequence(documents[0].input_ids, documents[0].labels, (len(documents[0]),))
    input_ids, labels = array("i"), array("i")
    for document in documents:
        input_ids.extend(document.input_ids)
        labels.extend(document.labels)
    return PackedSequence(TokenIds(input_ids), TokenIds(labels), tuple(map(len, documents)))


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
