"""build_sft_dataset on real Open Assistant trees and self-instruct seed tasks."""

from __future__ import annotations

import json

import pytest

from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data import sft_dataset
from offline_rlhf.data.sft_dataset import build_sft_dataset, write_dataset_card
from offline_rlhf.data.sft_readers import read_sft_source
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import IGNORE_INDEX
from offline_rlhf.data.tokenizer import train_bpe_tokenizer

OASST_TREES = "open-assistant/model_eval_manual_data/en_100_tree.jsonl"
SEED_TASKS = "self-instruct/data/seed_tasks.jsonl"
SHAKESPEARE = "tiny-corpora/char-rnn/tinyshakespeare/input.txt"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, shared_data):
    return train_bpe_tokenizer([shared_data / SHAKESPEARE], 512, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def config(shared_data):
    def make(**overrides) -> DataConfig:
        sources = [
            SourceConfig(name="oasst", format="oasst", path=str(shared_data / OASST_TREES)),
            SourceConfig(name="seed", format="self_instruct", path=str(shared_data / SEED_TASKS), weight=3.0),
        ]
        return DataConfig(**{"sources": sources, "max_seq_len": 512, "val_fraction": 0.1, **overrides})

    return make


def real_tokens(sequences):
    return sum(map(len, sequences))


def test_card_counts_match_the_sequences(config, tokenizer, shared_data):
    data = build_sft_dataset(config(), tokenizer, seed=0)
    card = data.card
    available = {"oasst": len(read_sft_source("oasst", shared_data / OASST_TREES)),
                 "seed": len(read_sft_source("self_instruct", shared_data / SEED_TASKS))}
    assert {name: entry["taken"] for name, entry in card["sources"].items()} == available
    assert card["totals"]["taken"] == sum(available.values())
    train_docs = sum(s.num_documents for s in data.train)
    val_docs = sum(s.num_documents for s in data.val)
    assert (card["train"]["documents"], card["val"]["documents"]) == (train_docs, val_docs)
    assert train_docs + val_docs == card["totals"]["taken"]
    assert val_docs == round(0.1 * sum(available.values()))
    assert card["totals"]["tokens"] == real_tokens(data.train) + real_tokens(data.val)
    trained = sum(label != IGNORE_INDEX for s in data.train + data.val for label in s.labels)
    assert card["totals"]["response_tokens"] == trained
    assert max(map(len, data.train + data.val)) <= 512
    assert (card["train"]["sequences"], card["val"]["sequences"]) == (len(data.train), len(data.val))


def test_total_samples_follow_the_weights_and_count_repeats(config, tokenizer):
    card = build_sft_dataset(config(total_samples=600), tokenizer, seed=0).card
    assert card["sources"]["oasst"] == {**card["sources"]["oasst"], "available": 142, "taken": 150, "repeated": 8}
    assert card["sources"]["seed"] == {**card["sources"]["seed"], "available": 175, "taken": 450, "repeated": 275}
    assert card["train"]["documents"] + card["val"]["documents"] == 600


def test_truncation_is_counted_per_source(config, tokenizer, shared_data):
    max_len = 64
    card = build_sft_dataset(config(max_seq_len=max_len), tokenizer, seed=0).card
    template = ChatTemplate()
    for name, fmt, path in (("oasst", "oasst", OASST_TREES), ("seed", "self_instruct", SEED_TASKS)):
        too_long = sum(
            len(tokenizer.encode(template.prompt_text(e.prompt)))
            + len(tokenizer.encode(template.response_text(e.response))) + 1 > max_len
            for e in read_sft_source(fmt, shared_data / path)
        )
        assert card["sources"][name]["truncated"] == too_long > 0


def test_packing_is_denser_than_one_document_per_sequence(config, tokenizer):
    packed = build_sft_dataset(config(), tokenizer, seed=0)
    single = build_sft_dataset(config(pack=False), tokenizer, seed=0)
    assert len(single.train) == single.card["train"]["documents"] == packed.card["train"]["documents"]
    assert len(packed.train) < len(single.train)
    assert packed.card["packing_efficiency"] > single.card["packing_efficiency"]
    assert single.card["packing_efficiency"] == pytest.approx(
        (real_tokens(single.train) + real_tokens(single.val)) / ((len(single.train) + len(single.val)) * 512))


def test_a_seed_fixes_the_dataset(config, tokenizer):
    first = build_sft_dataset(config(), tokenizer, seed=7)
    again = build_sft_dataset(config(), tokenizer, seed=7)
    other = build_sft_dataset(config(), tokenizer, seed=8)
    assert (again.train, again.val) == (first.train, first.val)
    assert other.val != first.val


def test_a_source_with_no_examples_is_named(config, tokenizer, monkeypatch):
    monkeypatch.setattr(sft_dataset, "read_sft_source", lambda fmt, path, **kwargs: [])
    with pytest.raises(ValueError, match="source 'oasst' has no examples"):
        build_sft_dataset(config(), tokenizer, seed=0)


def test_write_dataset_card(config, tokenizer, tmp_path):
    card = build_sft_dataset(config(), tokenizer, seed=0).card
    write_dataset_card(card, tmp_path / "sft")
    assert json.loads((tmp_path / "sft" / "dataset_card.json").read_text()) == card
    summary = (tmp_path / "sft" / "dataset_card.md").read_text()
    assert "| oasst | 142 | 142 | 0 |" in summary and "| seed | 175 | 175 | 0 |" in summary
