"""The labeled alignment set: cut-off answers train without EOS, blank answers are skipped
and counted, and copies of one answer never straddle the validation split."""

from __future__ import annotations

import json

import pytest

from offline_rlhf.data.alignment_dataset import build_alignment_dataset
from offline_rlhf.data.errors import DataError
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(rm_tokenizer_dir):
    return Tokenizer.from_dir(rm_tokenizer_dir)


def labeled(write_file, *records):
    return write_file("labeled.jsonl", *(json.dumps({"prompt": "p", "reward": 0.5, **r}) for r in records))


def build(path, tokenizer, val_fraction=0.0):
    return build_alignment_dataset(path, tokenizer, ChatTemplate(), 64, val_fraction, 0, reward_prompt=False)


def test_a_cut_off_answer_is_trained_without_eos(write_file, tokenizer):
    path = labeled(write_file, {"response": "a b", "finished": True}, {"response": "a b", "finished": False})
    finished, cut = (item.sequence.input_ids for item in build(path, tokenizer).train)
    assert finished[-1] == tokenizer.eos_id and cut == finished[:-1]


def test_blank_answers_are_skipped_and_counted(write_file, tokenizer):
    path = labeled(write_file, {"response": "a"}, {"response": "  "}, {"response": "b"})
    dataset = build(path, tokenizer)
    assert len(dataset.train) == 2 and sum(dataset.card["skipped"].values()) == 1
    with pytest.raises(DataError, match=r"labeled.jsonl:2: "):  # data.strict=true: the blank one is an error
        build_alignment_dataset(path, tokenizer, ChatTemplate(), 64, 0.0, 0, reward_prompt=False, strict=True)
    with pytest.raises(DataError, match="labeled.jsonl:1: expected 'finished' to be bool"):
        build(labeled(write_file, {"response": "a", "finished": "yes"}), tokenizer)


def test_copies_of_one_answer_land_on_one_side_of_the_split(write_file, tokenizer):
    records = [{"response": "same"}] * 30 + [{"response": f"other {i}"} for i in range(30)]
    dataset = build(labeled(write_file, *records), tokenizer, val_fraction=0.3)
    same = tokenizer.encode(" same")[-1]
    sides = {side for side, items in (("train", dataset.train), ("val", dataset.val))
             for item in items if same in item.sequence.input_ids}
    assert len(sides) == 1 and len(dataset.val) > 0
