"""A generation cut at max_new_tokens (`finished: false`) is encoded without EOS, left out of
labeling by default and kept (marked) on request; a non-boolean `finished` is malformed."""

import json

import pytest

from offline_rlhf.data.errors import DataError
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import IGNORE_INDEX, encode_sft
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.labeling.samples import UNFINISHED, read_samples


@pytest.fixture(scope="module")
def tokenizer(rm_tokenizer_dir):
    return Tokenizer.from_dir(rm_tokenizer_dir)


def test_unfinished_response_has_no_eos_and_loses_nothing_else(tokenizer):
    ended = encode_sft(tokenizer, ChatTemplate(), "Say something.", "apple river", 64, "s")
    cut = encode_sft(tokenizer, ChatTemplate(), "Say something.", "apple river", 64, "s", eos=False)
    assert ended.input_ids == cut.input_ids + (tokenizer.eos_id,) and ended.labels == cut.labels + (tokenizer.eos_id,)
    assert cut.input_ids[-1] != tokenizer.eos_id and cut.labels[-1] != IGNORE_INDEX and not cut.truncated


def generated(write_file, *finished):
    return str(write_file("gen.jsonl", *(json.dumps({"prompt": f"p{i}", "response": f"r{i}", "finished": f})
                                         for i, f in enumerate(finished))))


def test_cut_off_generations_are_left_out_and_counted_by_default(write_file):
    skips = Skips()
    samples = read_samples("gen", "generated", "jsonl", generated(write_file, True, False, True), ChatTemplate(),
                           None, 0, skips)
    assert [s.response for s in samples] == ["r0", "r2"] and skips.counts == {UNFINISHED: 1}
    assert all(s.finished is None for s in samples)


def test_include_unfinished_keeps_and_marks_them(write_file):
    skips = Skips()
    samples = read_samples("gen", "generated", "jsonl", generated(write_file, True, False), ChatTemplate(),
                           None, 0, skips, include_unfinished=True)
    assert [(s.response, s.finished) for s in samples] == [("r0", None), ("r1", False)] and skips.counts == {}


def test_max_samples_draws_from_finished_samples(write_file):
    path = generated(write_file, False, False, True, True, True)
    samples = read_samples("gen", "generated", "jsonl", path, ChatTemplate(), 3, 0, Skips())
    assert sorted(s.response for s in samples) == ["r2", "r3", "r4"]


def test_non_boolean_finished_is_malformed(write_file):
    path = write_file("gen.jsonl", json.dumps({"prompt": "p", "response": "r", "finished": "no"}))
    with pytest.raises(DataError, match=rf"^{path}:1: expected 'finished' to be bool \(got str\)$"):
        read_samples("gen", "generated", "jsonl", str(path), ChatTemplate(), None, 0, Skips())
