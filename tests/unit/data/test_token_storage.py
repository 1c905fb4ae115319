"""Token fields held compactly (`TokenIds`, document lengths instead of a position and a
document id per token) and read as the tuples they replaced: the bytes a token costs in a
dataset built from real data, collated batches equal to what the tuple code built, and
every digest of token fields (reference shards, training fingerprints) unchanged. The
`Old*` classes and `old_*` functions are frozen copies of the tuple code."""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import pickle
import tracemalloc
from dataclasses import dataclass, replace

import pytest
import torch

from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data.alignment_dataset import RewardedSequence
from offline_rlhf.data.batching import PAD_DOCUMENT, collate_sequences
from offline_rlhf.data.packing import PackedSequence, pack_samples, unpacked
from offline_rlhf.data.pair_dataset import ReferencedPair, tokens_digest
from offline_rlhf.data.preference_dataset import build_preference_dataset
from offline_rlhf.data.preference_readers import read_hh_rlhf
from offline_rlhf.data.sft_dataset import build_sft_dataset
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.tokenize import IGNORE_INDEX, TokenIds, TokenizedSample
from offline_rlhf.data.tokenizer import train_bpe_tokenizer
from offline_rlhf.stage_support import items_digest
from tests.local_data import HH_HARMLESS

MAX_BYTES_PER_TOKEN = 12  # measured 8.4 (packed SFT) and 9.6 (pair sequences); the tuples took about 61


@dataclass(frozen=True)
class OldTokenizedSample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    source: str
    truncated: bool


@dataclass(frozen=True)
class OldPackedSequence:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    positions: tuple[int, ...]
    document_ids: tuple[int, ...]


def old_concat(documents) -> OldPackedSequence:
    input_ids, labels, positions, document_ids = [], [], [], []
    for index, document in enumerate(documents):
        input_ids.extend(document.input_ids)
        labels.extend(document.labels)
        positions.extend(range(len(document.input_ids)))
        document_ids.extend([index] * len(document.input_ids))
    return OldPackedSequence(tuple(input_ids), tuple(labels), tuple(positions), tuple(document_ids))


def old_pack(samples, seq_len: int) -> list[OldPackedSequence]:
    groups, used = [], seq_len
    for sample in samples:
        if used + len(sample.input_ids) > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(sample)
        used += len(sample.input_ids)
    return [old_concat(group) for group in groups]


def old_collate(sequences, pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    longest = max(len(s.input_ids) for s in sequences)
    length = -(-longest // multiple_of) * multiple_of

    def padded(values, fill):
        return torch.tensor([list(v) + [fill] * (length - len(v)) for v in values], dtype=torch.long)

    return {"tokens": padded((s.input_ids for s in sequences), pad_id),
            "labels": padded((s.labels for s in sequences), IGNORE_INDEX),
            "positions": padded((s.positions for s in sequences), 0),
            "document_ids": padded((s.document_ids for s in sequences), PAD_DOCUMENT)}


def old_sample(sample: TokenizedSample) -> OldTokenizedSample:
    return OldTokenizedSample(tuple(sample.input_ids), tuple(sample.labels), sample.source, sample.truncated)


def old_sequence(sequence: PackedSequence) -> OldPackedSequence:
    return OldPackedSequence(*(tuple(getattr(sequence, name)) for name in
                               ("input_ids", "labels", "positions", "document_ids")))


@pytest.fixture(scope="module")
def hh_files(tmp_path_factory, shared_data):
    """The real hh-rlhf pairs, their SFT view (prompt, chosen) and a BPE tokenizer of
    8,000 tokens trained on them (most ids above 256, as with a real vocabulary)."""
    folder = tmp_path_factory.mktemp("hh")
    sft = folder / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.chosen}) + "\n"
                           for e in read_hh_rlhf(HH_HARMLESS, skips=Skips())))
    return sft, train_bpe_tokenizer([HH_HARMLESS], 8000, folder / "tokenizer")


def sft_config(path, **data) -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="hh", format="jsonl", path=str(path))], **data)


def rm_config(**data) -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="hh", format="hh_rlhf", path=str(HH_HARMLESS))], pack=False, **data)


def retained_per_token(build, sequences_of) -> float:
    """Bytes per token that the sequences `build()` made still hold, by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sequences = sequences_of(build())
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    return held / sum(map(len, sequences))


def test_a_packed_sft_dataset_of_real_data_holds_few_bytes_a_token(hh_files):
    sft, tokenizer = hh_files
    per_token = retained_per_token(
        lambda: build_sft_dataset(sft_config(sft, max_seq_len=1024, pack=True), tokenizer, seed=0, progress=False),
        lambda dataset: dataset.train + dataset.val)
    assert per_token < MAX_BYTES_PER_TOKEN


def test_reward_model_pairs_of_real_data_hold_few_bytes_a_token(hh_files):
    _, tokenizer = hh_files
    per_token = retained_per_token(
        lambda: build_preference_dataset(rm_config(max_seq_len=512), tokenizer, seed=0, progress=False),
        lambda dataset: [side for pair in dataset.train + dataset.val for side in (pair.chosen, pair.rejected)])
    assert per_token < MAX_BYTES_PER_TOKEN


def test_collated_batches_of_real_data_equal_the_tuple_codes(hh_files):
    sft, tokenizer = hh_files
    unpacked_data = build_sft_dataset(sft_config(sft, max_seq_len=256, pack=False), tokenizer, seed=0, progress=False)
    samples = [TokenizedSample(s.input_ids, s.labels, "hh", False) for s in unpacked_data.train]
    assert sum(len(s) for s in samples) > 100_000
    packed, before = pack_samples(samples, 1024), old_pack([old_sample(s) for s in samples], 1024)
    assert max(s.num_documents for s in packed) > 5
    # Unpacked as the stages hold pairs, with an empty sample (no tokens) among them.
    empty = TokenizedSample((), (), "empty", False)
    for new, old in ((packed, before), (unpacked([*samples[:50], empty]), [old_concat([old_sample(s)]) for s in
                                                                         [*samples[:50], empty]])):
        for start, multiple in ((0, 1), (3, 8), (7, 64)):
            got, expected = collate_sequences(new[start:start + 7], 5, multiple), old_collate(old[start:start + 7], 5,
                                                                                               multiple)
            assert got.keys() == expected.keys()
            for key in expected:
                assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    assert [old_sequence(s) for s in packed] == before


def test_an_empty_sequence_collates_as_padding():
    samples = [TokenizedSample((), (), "e", False), TokenizedSample((7, 8, 9), (IGNORE_INDEX, 8, 9), "s", False)]
    batch = collate_sequences(unpacked(samples), pad_id=3, multiple_of=4)
    assert batch["tokens"].tolist() == [[3] * 4, [7, 8, 9, 3]]
    assert batch["document_ids"].tolist() == [[PAD_DOCUMENT] * 4, [0, 0, 0, PAD_DOCUMENT]]
    assert batch["positions"].tolist() == [[0] * 4, [0, 1, 2, 0]]


def test_token_ids_read_as_the_tuples_they_replace():
    ids = TokenIds((5, 300, 70000, -100))
    assert ids == (5, 300, 70000, -100) and (5, 300, 70000, -100) == ids and ids != (5, 300)
    assert ids != [5, 300, 70000, -100]  # a tuple is never equal to a list
    assert hash(ids) == hash((5, 300, 70000, -100)) and repr(ids) == "(5, 300, 70000, -100)"
    assert ids[1:3] == (300, 70000) and isinstance(ids[1:3], TokenIds) and ids[-1] == -100
    assert ids + (1,) == (5, 300, 70000, -100, 1) and (1,) + ids == (1, 5, 300, 70000, -100)
    assert isinstance(ids + (1,), TokenIds) and isinstance((1,) + ids, TokenIds) and ids + ids == (*ids, *ids)
    assert ids.count(-100) == 1 and 70000 in ids and list(ids) == [5, 300, 70000, -100] and ids.itemsize == 4
    grown = ids
    grown += (2,)
    assert grown == (*ids, 2) and ids == (5, 300, 70000, -100)  # a new one, as with a tuple
    for change in (lambda: ids.append(1), lambda: ids.extend((1,)), lambda: ids.__setitem__(0, 1),
                   lambda: ids.__delitem__(0), lambda: ids.pop(), lambda: ids.reverse()):
        with pytest.raises(TypeError, match="read-only"):
            change()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = pickle.loads(pickle.dumps(ids, protocol))
        assert type(loaded) is TokenIds and loaded == ids
    assert copy.deepcopy(ids) is ids and copy.copy(ids) is ids


def test_samples_and_sequences_compare_hash_and_refuse_as_before():
    sample = TokenizedSample((1, 300, 3), (IGNORE_INDEX, 300, 3), "s", False)
    old = OldTokenizedSample((1, 300, 3), (IGNORE_INDEX, 300, 3), "s", False)
    assert isinstance(sample.input_ids, TokenIds) and sample.response_tokens == 2 and len(sample) == 3
    assert hash(sample) == hash(old) and repr(sample) == repr(old).replace("OldTokenizedSample", "TokenizedSample")
    assert sample == TokenizedSample([1, 300, 3], [IGNORE_INDEX, 300, 3], "s", False)
    assert pickle.loads(pickle.dumps(sample)) == sample
    with pytest.raises(ValueError, match="2 input ids but 1 labels"):
        TokenizedSample((1, 2), (IGNORE_INDEX,), "s", False)
    one = unpacked([sample])[0]
    assert one.input_ids is sample.input_ids  # shared, not copied (both read-only)
    # A trailing empty document has no document id, as when ids were stored per token.
    for documents in ([sample, TokenizedSample((), (), "e", False)], [TokenizedSample((), (), "e", False)]):
        new, old = packing_concat(documents), old_concat(documents)
        assert new.num_documents == (old.document_ids[-1] + 1 if old.document_ids else 0)
        assert (new.positions, new.document_ids) == (old.positions, old.document_ids)


def packing_concat(documents) -> PackedSequence:
    from offline_rlhf.data.packing import _concat

    return _concat(documents)


def test_the_reference_stages_pair_digest_is_unchanged():
    chosen = TokenizedSample((1, 300, 70000), (IGNORE_INDEX, 300, 70000), "c", False)
    rejected = TokenizedSample((1, 300, 9), (IGNORE_INDEX, 300, 9), "r", True)
    expected = hashlib.sha1(repr(((1, 300, 70000), (IGNORE_INDEX, 300, 70000), (1, 300, 9),
                                  (IGNORE_INDEX, 300, 9))).encode()).hexdigest()
    assert tokens_digest(chosen, rejected) == expected


def test_training_fingerprints_digest_the_former_fields(hh_files):
    sft, tokenizer = hh_files
    packed = build_sft_dataset(sft_config(sft, max_seq_len=512, pack=True, total_samples=200), tokenizer, seed=0,
                               progress=False).train
    pairs = build_preference_dataset(rm_config(max_seq_len=128, total_samples=40), tokenizer, seed=0,
                                     progress=False).train
    rewarded = [RewardedSequence(sequence, 0.5 * index) for index, sequence in enumerate(packed[:20])]
    referenced = [ReferencedPair(p.chosen, p.rejected, -1.5, -2.0) for p in pairs]
    assert items_digest(packed) == items_digest([old_sequence(s) for s in packed])
    for items in (pairs, rewarded, referenced):
        name = "sequence" if isinstance(items[0], RewardedSequence) else None
        old = [replace(item, sequence=old_sequence(item.sequence)) if name else
               replace(item, chosen=old_sequence(item.chosen), rejected=old_sequence(item.rejected)) for item in items]
        assert items_digest(items) == items_digest(old)
    assert items_digest(packed) != items_digest(packed[1:])
