"""Packing: greedy in order, positions and document ids per document, and the same
next-token targets as one document per sequence."""

from __future__ import annotations

import random

import pytest

from offline_rlhf.data.packing import PackedSequence, pack_samples, unpacked
from offline_rlhf.data.tokenize import IGNORE_INDEX, TokenizedSample


def make_samples(lengths, prompt_len=2):
    """Samples with distinct ids; the first `prompt_len` tokens of each are prompt."""
    samples, next_id = [], 1
    for index, length in enumerate(lengths):
        ids = tuple(range(next_id, next_id + length))
        next_id += length
        prompt = min(prompt_len, length)
        samples.append(TokenizedSample(ids, (IGNORE_INDEX,) * prompt + ids[prompt:], f"test:{index}", False))
    return samples


def documents(sequences):
    """The (input_ids, labels) of every document, read back from sequences by document id."""
    found = []
    for sequence in sequences:
        for doc in range(sequence.num_documents):
            at = [t for t in range(len(sequence)) if sequence.document_ids[t] == doc]
            assert at == list(range(at[0], at[0] + len(at)))  # contiguous
            assert [sequence.positions[t] for t in at] == list(range(len(at)))
            found.append((tuple(sequence.input_ids[t] for t in at), tuple(sequence.labels[t] for t in at)))
    return found


def trained_targets(sequences):
    """(document's own context length, target) for every trained next-token prediction:
    logits at t score labels[t + 1], the shift the loss applies."""
    targets = []
    for sequence in sequences:
        for t in range(len(sequence) - 1):
            if sequence.labels[t + 1] != IGNORE_INDEX:
                assert sequence.document_ids[t] == sequence.document_ids[t + 1], "target predicted across documents"
                targets.append((sequence.positions[t], sequence.labels[t + 1]))
    return targets


def test_greedy_packing_in_order():
    sequences = pack_samples(make_samples([4, 3, 5, 2, 6, 8]), seq_len=8)
    assert [len(s) for s in sequences] == [7, 7, 6, 8]
    assert [s.num_documents for s in sequences] == [2, 2, 1, 1]
    first = sequences[0]
    assert first.positions == (0, 1, 2, 3, 0, 1, 2)
    assert first.document_ids == (0, 0, 0, 0, 1, 1, 1)
    assert first.input_ids == tuple(range(1, 8))
    assert first.labels == (IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX, 7)


def test_every_sample_once_in_order_and_no_sequence_too_long():
    rng = random.Random(0)
    samples = make_samples([rng.randint(3, 32) for _ in range(200)])
    sequences = pack_samples(samples, seq_len=32)
    assert max(map(len, sequences)) <= 32
    assert documents(sequences) == [(s.input_ids, s.labels) for s in samples]
    assert len(sequences) < len(samples)


def test_packed_and_unpacked_train_on_the_same_targets():
    samples = make_samples([5, 9, 3, 7, 4, 6, 2, 8], prompt_len=3)
    packed, single = pack_samples(samples, seq_len=16), unpacked(samples)
    assert len(packed) < len(single) == len(samples)
    assert all(s.num_documents == 1 for s in single)
    assert documents(single) == [(s.input_ids, s.labels) for s in samples]
    assert trained_targets(packed) == trained_targets(single)
    assert len(trained_targets(single)) == sum(s.response_tokens for s in samples)


def test_a_trained_first_label_is_refused():
    ids = (1, 2, 3)
    with pytest.raises(ValueError, match="first label"):
        pack_samples([TokenizedSample(ids, ids, "test:bad", False)], seq_len=8)


def test_a_sample_longer_than_seq_len_is_refused():
    with pytest.raises(ValueError, match="test:1: 9 tokens do not fit seq_len=8"):
        pack_samples(make_samples([8, 9]), seq_len=8)


def test_fields_must_have_one_length():
    with pytest.raises(ValueError, match="one length"):
        PackedSequence((1, 2), (IGNORE_INDEX,), (2,))
    with pytest.raises(ValueError, match="one length"):
        PackedSequence((1, 2), (IGNORE_INDEX, 2), (1,))
