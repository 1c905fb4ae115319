"""build_preference_dataset: both replies tokenized by encode_sft's rule, split by pair, counted in the card;
and the malformed-record cases the reader tests do not already cover."""

import json
import os

import pytest

from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data.errors import DataError
from offline_rlhf.data.preference_dataset import build_preference_dataset
from offline_rlhf.data.preference_readers import common_prefix_length, read_hh_rlhf, read_preference_jsonl
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_sft
from offline_rlhf.data.tokenizer import Tokenizer
from tests.local_data import HH_HARMLESS
from tests.synthetic_preferences import write_preferences


@pytest.fixture(scope="module")
def tokenizer(rm_tokenizer_dir):
    return Tokenizer.from_dir(rm_tokenizer_dir)


def config(path, **data) -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="synthetic", format="jsonl", path=str(path))], pack=False, **data)


def test_pairs_are_both_replies_through_encode_sft(tmp_path, tokenizer):
    cfg = config(write_preferences(tmp_path / "p.jsonl", 50), max_seq_len=64, val_fraction=0.2)
    dataset = build_preference_dataset(cfg, tokenizer, seed=3)
    assert (len(dataset.train), len(dataset.val)) == (40, 10)
    for pair in dataset.train + dataset.val:
        example = pair.example
        expected = encode_sft(tokenizer, ChatTemplate(), example.prompt, example.chosen, 64, example.source)
        assert pair.chosen.input_ids == expected.input_ids
        assert pair.chosen.input_ids[-1] == pair.rejected.input_ids[-1] == tokenizer.eos_id  # the reward token
    assert {p.example for p in dataset.train}.isdisjoint({p.example for p in dataset.val})
    assert build_preference_dataset(cfg, tokenizer, seed=3).val == dataset.val  # seeded


def test_card_counts_pairs_sequences_and_truncation(tmp_path, tokenizer):
    cfg = config(write_preferences(tmp_path / "p.jsonl", 50), max_seq_len=24, val_fraction=0.2)
    dataset = build_preference_dataset(cfg, tokenizer, seed=3)
    card = dataset.card
    pairs = dataset.train + dataset.val
    sequences = [s for p in pairs for s in (p.chosen, p.rejected)]
    assert card["kind"] == "preference pairs"
    assert card["totals"]["taken"] == 50
    assert (card["train"]["documents"], card["train"]["sequences"]) == (len(dataset.train), 2 * len(dataset.train))
    assert card["totals"]["tokens"] == sum(map(len, sequences))
    assert card["totals"]["truncated"] == sum(len(s) == 24 for s in sequences) > 0
    assert all(len(s) <= 24 for s in sequences)


def test_pairs_identical_after_truncation_are_dropped_and_counted(write_file, tokenizer):
    long_prompt = " ".join(["apple river stone"] * 30)
    path = write_file("p.jsonl", json.dumps({"prompt": long_prompt, "chosen": "same start then a",
                                             "rejected": "same start then b"}),
                      json.dumps({"prompt": "hi", "chosen": "good good", "rejected": "stone"}))
    # max_len 16 keeps 8 prompt tokens, then cuts both replies before they differ.
    dataset = build_preference_dataset(config(path, max_seq_len=16, val_fraction=0.0), tokenizer, seed=0)
    assert [p.example.prompt for p in dataset.train] == ["hi"]
    assert dataset.card["sources"]["synthetic"]["identical_after_truncation"] == 1


# --- malformed records: hh-rlhf missing Assistant turn (chosen side), identical replies and a missing
# field are covered in tests/unit/data/test_preference_readers.py; these are the remaining cases.


def test_hh_rejected_without_assistant_turn_names_file_and_line(write_file):
    good = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"})
    bad = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi"})
    path = write_file("hh.jsonl", good, bad)
    with pytest.raises(DataError, match=rf"^{path}:2: expected 'rejected' to contain an '\\n\\nAssistant:' turn"):
        read_hh_rlhf(path)


def test_hh_missing_chosen_names_file_and_line(write_file):
    path = write_file("hh.jsonl", json.dumps({"rejected": "\n\nHuman: hi\n\nAssistant: b"}))
    with pytest.raises(DataError, match=rf"^{path}:1: expected an object with key 'chosen' \(missing\)"):
        read_hh_rlhf(path)


def test_jsonl_identical_replies_name_file_and_line(write_file):
    path = write_file("p.jsonl", json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}),
                      json.dumps({"prompt": "p", "chosen": " same", "rejected": "same "}))
    with pytest.raises(DataError, match=rf"^{path}:2: expected 'chosen' and 'rejected' to differ \(identical\)"):
        read_preference_jsonl(path)


def test_the_common_prefix_of_two_transcripts_is_the_characters_they_share():
    """The bisection over slices agrees with a character walk on every real hh-rlhf pair and
    at the edges (empty, equal, one a prefix of the other, a difference in the first or last
    character, non-ASCII text)."""
    pairs = [(r["chosen"], r["rejected"]) for r in map(json.loads, HH_HARMLESS.read_text().splitlines())]
    pairs += [("", ""), ("", "a"), ("abc", "abc"), ("abc", "abcd"), ("xbc", "abc"), ("abx", "aby"),
              ("héllo wörld ✓", "héllo wörld ✗"), ("日本語", "日本")]
    for one, other in pairs:
        assert common_prefix_length(one, other) == len(os.path.commonprefix([one, other])), (one[:80], other[:80])
