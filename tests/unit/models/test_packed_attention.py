"""Packed sequences: document masking gives exactly the per-document results."""

from types import SimpleNamespace

import pytest
import torch

from offline_rlhf.data.batching import collate_sequences
from offline_rlhf.data.packing import pack_samples, unpacked
from offline_rlhf.data.tokenize import IGNORE_INDEX, TokenizedSample
from offline_rlhf.losses.logprobs import shifted_token_nll
from offline_rlhf.losses.sft import sft_loss
from offline_rlhf.models.masks import dense_document_mask, flex_document_mask
from offline_rlhf.stages.sft import fixed_length
from tests.fixtures import reference_model


def _samples(lengths=(5, 9, 3, 7, 6), prompt=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for index, length in enumerate(lengths):
        ids = torch.randint(3, 256, (length,), generator=gen).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        samples.append(TokenizedSample(tuple(ids), tuple(labels), f"s{index}", False))
    return samples


def _loss_sum(model, sequences, packed):
    batch = collate_sequences(sequences, pad_id=0)
    mask = dense_document_mask(batch["document_ids"]) if packed else None
    logits = model(batch["tokens"], positions=batch["positions"], attn_mask=mask)
    return sft_loss(*shifted_token_nll(logits, batch["labels"]), normalizer=1.0)[0]


def test_packed_loss_equals_unpacked_loss():
    model = reference_model()
    samples = _samples()
    packed = pack_samples(samples, seq_len=16)
    assert len(packed) < len(samples)  # really packed several documents per row
    torch.testing.assert_close(_loss_sum(model, packed, True), _loss_sum(model, unpacked(samples), False),
                               atol=1e-5, rtol=1e-6)


def test_without_the_mask_packing_would_leak_across_documents():
    model = reference_model()
    packed = pack_samples(_samples(), seq_len=16)
    leaked = _loss_sum(model, packed, packed=False)
    assert not torch.allclose(leaked, _loss_sum(model, packed, True), atol=1e-3)


def test_flex_and_dense_routes_agree():
    """FlexAttention is the CUDA route; its forward runs on CPU too (its backward does not)."""
    model = reference_model()
    batch = collate_sequences(pack_samples(_samples(), seq_len=16), pad_id=0)
    with torch.no_grad():
        dense = model(batch["tokens"], positions=batch["positions"],
                      attn_mask=dense_document_mask(batch["document_ids"]))
        flex = model(batch["tokens"], positions=batch["positions"], attn_mask=flex_document_mask(batch["document_ids"]))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_collate_pads_to_a_multiple():
    batch = collate_sequences(unpacked(_samples(lengths=(5, 3))), pad_id=7, multiple_of=4)
    assert batch["tokens"].shape == (2, 8)
    assert batch["tokens"][1, 3:].tolist() == [7] * 5
    assert batch["labels"][1, 3:].tolist() == [IGNORE_INDEX] * 5
    assert batch["document_ids"][1].tolist() == [0, 0, 0, -1, -1, -1, -1, -1]


def test_packed_rows_padded_to_a_fixed_length_give_the_same_loss_and_cuda_uses_max_seq_len():
    """On CUDA packed rows all take max_seq_len (one shape for compiled FlexAttention);
    the extra padding changes no loss, and a row longer than the fixed length is refused."""
    model = reference_model()
    packed = pack_samples(_samples(), seq_len=16)
    batch = collate_sequences(packed, pad_id=0, length=24)
    assert batch["tokens"].shape[1] == 24
    mask = dense_document_mask(batch["document_ids"])
    logits = model(batch["tokens"], positions=batch["positions"], attn_mask=mask)
    torch.testing.assert_close(sft_loss(*shifted_token_nll(logits, batch["labels"]), normalizer=1.0)[0],
                               _loss_sum(model, packed, True), atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="fixed length 8"):
        collate_sequences(packed, pad_id=0, length=8)

    def rt(device, multiple=1):
        return SimpleNamespace(device=torch.device(device), dims=SimpleNamespace(sequence_multiple=multiple))
    assert fixed_length(True, 4096, rt("cuda")) == 4096
    assert fixed_length(True, 1001, rt("cuda", multiple=8)) == 1008  # sequence parallelism's multiple
    assert fixed_length(False, 4096, rt("cuda")) is None and fixed_length(True, 4096, rt("cpu")) is None
