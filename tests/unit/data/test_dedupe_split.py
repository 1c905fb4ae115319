"""Copies of one record at different lines stay on one side of the validation split (split by
content, not by source line); the card counts duplicates; `data.dedupe=true` drops them."""

import json

import pytest

from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data.mixing import content_key, drop_duplicates, split_validation
from offline_rlhf.data.preference_dataset import build_preference_dataset
from offline_rlhf.data.sft_dataset import build_sft_dataset, read_summary
from offline_rlhf.data.tokenizer import Tokenizer
from tests.synthetic_preferences import preference_records


@pytest.fixture(scope="module")
def tokenizer(rm_tokenizer_dir):
    return Tokenizer.from_dir(rm_tokenizer_dir)


def sft_file(write_file, copies=50, others=50):
    """`copies` identical lines of one record among `others` distinct ones."""
    lines = [json.dumps({"prompt": f"question {i}", "response": f"answer {i}"}) for i in range(others)]
    lines += [json.dumps({"prompt": "the copied question", "response": "the copied answer"})] * copies
    return write_file("sft.jsonl", *lines)


def sft_config(path, **data) -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="demos", format="jsonl", path=str(path))], val_fraction=0.2,
                      max_seq_len=64, pack=False, **data)


def copies_in(sequences, tokenizer, text="the copied answer"):
    return sum(text in tokenizer.decode(list(s.input_ids)) for s in sequences)


@pytest.mark.parametrize("seed", range(6))
def test_copies_of_a_record_never_straddle_the_split(write_file, tokenizer, seed):
    dataset = build_sft_dataset(sft_config(sft_file(write_file)), tokenizer, seed=seed)
    in_train, in_val = copies_in(dataset.train, tokenizer), copies_in(dataset.val, tokenizer)
    assert sorted((in_train, in_val)) == [0, 50]
    assert dataset.card["sources"]["demos"]["duplicates"] == 49 and dataset.card["dedupe"] is False


def test_split_size_counts_distinct_texts(write_file, tokenizer):
    dataset = build_sft_dataset(sft_config(sft_file(write_file)), tokenizer, seed=0)
    # 51 distinct texts -> round(51 * 0.2) = 10 of them in validation (1 or 50 documents each).
    assert dataset.card["val"]["documents"] in (10, 59)


def test_dedupe_drops_exact_copies_and_counts_them(write_file, tokenizer):
    dataset = build_sft_dataset(sft_config(sft_file(write_file), dedupe=True), tokenizer, seed=0)
    card = dataset.card
    assert card["sources"]["demos"]["available"] == 51 and card["totals"]["taken"] == 51
    assert card["sources"]["demos"]["duplicates"] == 49 and card["dedupe"] is True
    assert copies_in(dataset.train + dataset.val, tokenizer) == 1
    assert "49 duplicates (dropped)" in read_summary(card)


def test_preference_copies_stay_on_one_side_and_dedupe(write_file, tokenizer):
    records = preference_records(40)
    path = write_file("p.jsonl", *map(json.dumps, records + [records[0]] * 20))
    cfg = DataConfig(sources=[SourceConfig(name="p", format="jsonl", path=str(path))], pack=False,
                     val_fraction=0.25, max_seq_len=64)
    dataset = build_preference_dataset(cfg, tokenizer, seed=1)
    sides = {side: sum(p.example.chosen == records[0]["chosen"] for p in pairs)
             for side, pairs in (("train", dataset.train), ("val", dataset.val))}
    assert sorted(sides.values()) == [0, 21] and dataset.card["totals"]["duplicates"] == 20
    deduped = build_preference_dataset(DataConfig(**{**cfg.__dict__, "dedupe": True}), tokenizer, seed=1)
    assert len(deduped.train) + len(deduped.val) == 40


def test_duplicates_across_sources_count_against_the_later_source(write_file, tokenizer):
    first = sft_file(write_file, copies=1, others=5)
    second = write_file("b.jsonl", json.dumps({"prompt": "question 2", "response": "answer 2"}),
                        json.dumps({"prompt": "new", "response": "new answer"}))
    cfg = DataConfig(sources=[SourceConfig(name="a", path=str(first)), SourceConfig(name="b", path=str(second))],
                     val_fraction=0.0, max_seq_len=64, dedupe=True)
    card = build_sft_dataset(cfg, tokenizer, seed=0).card
    assert (card["sources"]["a"]["duplicates"], card["sources"]["b"]["duplicates"]) == (0, 1)
    assert card["sources"]["b"]["available"] == 1


def test_split_validation_key_and_content_key():
    items = [("line 1", "same"), ("line 2", "same"), ("line 3", "other"), ("line 4", "third")]
    train, val = split_validation(items, 0.34, seed=0, key=lambda item: item[1])
    assert {text for _, text in train}.isdisjoint({text for _, text in val}) and len(train) + len(val) == 4
    assert content_key("ab", "c") != content_key("a", "bc") and content_key("x") == content_key("x")
    kept, counts = drop_duplicates([("s", ["a", "b", "a"], 1.0)], key=str, dedupe=False)
    assert kept == [("s", ["a", "b", "a"], 1.0)] and counts == {"s": 1}
