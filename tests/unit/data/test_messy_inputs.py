"""Messy JSONL found at scale (review at 100k records): what json cannot read, or reads
wrongly, is a DataError naming file:line, never a traceback or a silent choice. An integer
of more than 4300 digits (ValueError) and nesting beyond the recursion limit (RecursionError,
an OASST tree thousands of turns deep too) used to escape the reader; a repeated key kept its
last value unnoticed; a UTF-16 file was "invalid byte 0xff"; a pair identical after
truncation named its file without its folder; a huge reward crashed align's statistics."""

import json

import pytest

from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data.alignment_dataset import read_labeled
from offline_rlhf.data.errors import DataError, UnusableRecord
from offline_rlhf.data.preference_dataset import build_preference_dataset
from offline_rlhf.data.preference_readers import read_oasst_pairs, read_preference_jsonl
from offline_rlhf.data.records import iter_json_objects
from offline_rlhf.data.sft_readers import read_sft_source
from offline_rlhf.data.tokenizer import Tokenizer

GOOD = json.dumps({"prompt": "p", "response": "r"})


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def oasst_tree(depth: int) -> str:
    """A tree `depth` messages deep, each message a reply of the one before."""
    message = {"text": f"turn {depth}", "role": "assistant" if depth % 2 else "prompter", "replies": []}
    text = json.dumps(message)
    for level in range(depth - 1, -1, -1):
        role = "assistant" if level % 2 else "prompter"
        text = f'{{"text": "turn {level}", "role": "{role}", "replies": [{text}]}}'
    return f'{{"message_tree_id": "deep", "prompt": {text}}}'


def read_error(path) -> str:
    with pytest.raises(DataError) as error:
        list(iter_json_objects(path))
    return str(error.value)


def test_an_integer_longer_than_python_converts_names_its_line(write_file):
    path = write_file("a.jsonl", GOOD, '{"prompt": "p", "response": "r", "n": %s}' % ("9" * 5000))
    assert read_error(path) == (f"{path}:2: expected a JSON object with numbers Python can read (an integer "
                                "literal has more than 4300 digits)")


def test_nesting_deeper_than_json_reads_names_its_line(write_file):
    path = write_file("a.jsonl", GOOD, '{"prompt": "p", "response": "r", "z": %s}' % nested(3000))
    assert read_error(path).startswith(f"{path}:2: expected a JSON object nested less than about ")


def test_a_deep_record_with_escapes_is_checked_without_recursion(write_file):
    # Parses (below json's limit), but the lone-surrogate check used to recurse as deep again.
    path = write_file("a.jsonl", '{"prompt": "caf\\u00e9", "z": %s}' % nested(900, '"\\u00e9"'))
    assert [record["prompt"] for _, record in iter_json_objects(path)] == ["café"]
    lone = write_file("b.jsonl", '{"prompt": "p", "z": %s}' % nested(900, '"\\ud800"'))
    assert read_error(lone) == f"{lone}:1: expected valid Unicode text in 0 (a lone surrogate escape \\ud800)"


@pytest.mark.parametrize("read", [lambda path: read_oasst_pairs(path),
                                  lambda path: read_sft_source("oasst", path)], ids=["pairs", "sft"])
def test_an_oasst_tree_thousands_of_turns_deep_is_an_error_naming_its_line(write_file, read):
    path = write_file("trees.jsonl", oasst_tree(3), oasst_tree(3000))
    with pytest.raises(DataError, match=rf"^{path}:2: expected a JSON object nested less than about "):
        read(path)


def test_an_oasst_tree_hundreds_of_turns_deep_reads(write_file):
    path = write_file("trees.jsonl", oasst_tree(300))
    assert len(read_sft_source("oasst", path)) > 100


@pytest.mark.parametrize("line,key", [
    ('{"prompt": "p", "response": "a", "response": "b"}', "response"),
    ('{"prompt": "p", "response": "r", "meta": {"k": 1, "k": 2}}', "k"),  # at every level
    ('{"prompt": "p", "response": "r", "turns": [{"role": "user", "role": "assistant"}]}', "role"),
])
def test_a_repeated_key_is_an_error_naming_line_and_key(write_file, line, key):
    path = write_file("a.jsonl", GOOD, line)
    assert read_error(path) == (f"{path}:2: expected a JSON object whose keys are unique (key {key!r} appears "
                                "more than once; json would keep only its last value)")


def test_equal_values_under_other_keys_and_nested_same_names_are_fine(write_file):
    path = write_file("a.jsonl", '{"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}], "c": 1, "d": 1}')
    assert [record for _, record in iter_json_objects(path)] == [
        {"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}], "c": 1, "d": 1}]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_a_utf16_file_is_named_as_such(write_file, encoding):
    text = "\n".join([GOOD, GOOD]) + "\n"
    bom = b"\xfe\xff" if encoding.endswith("be") else b""
    path = write_file("a.jsonl", bom + text.encode(encoding).rstrip(b"\n\x00"))
    assert read_error(path) == (f"{path}:1: expected UTF-8 text (the file starts with a UTF-16 byte-order mark: "
                                "it looks like UTF-16; save it as UTF-8)")


def test_utf16_without_a_byte_order_mark_is_named_as_such(write_file):
    path = write_file("a.jsonl", GOOD.encode("utf-16-le"))
    assert read_error(path).endswith("(a third or more of the line is NUL bytes: it looks like UTF-16; save it as "
                                     "UTF-8)")


def test_a_raw_nul_in_a_string_is_not_called_utf16(write_file):
    path = write_file("a.jsonl", b'{"prompt": "p\x00", "response": "r"}')
    assert read_error(path) == f"{path}:1: expected a JSON object (invalid JSON: Invalid control character at, " \
                               "column 14)"


def labeled(reward: str) -> str:
    return '{"prompt": "p", "response": "r", "reward": %s}' % reward


@pytest.mark.parametrize("reward", ["1e200", "-1e300", "1000001", "1" + "0" * 300])
def test_a_huge_reward_is_an_error_naming_its_line(write_file, reward):
    path = write_file("labeled.jsonl", labeled("0.5"), labeled(reward))
    with pytest.raises(DataError) as error:
        read_labeled(path)
    assert str(error.value) == (f"{path}:2: expected 'reward' to be a normalized reward (a z-score, at most 1e+06 "
                                f"in absolute value; got {float(reward):g})")


def test_rewards_within_the_bound_read(write_file):
    path = write_file("labeled.jsonl", labeled("1e6"), labeled("-999999.5"), labeled("3.25"))
    assert [e.reward for e in read_labeled(path)] == [1e6, -999999.5, 3.25]


LONG_PROMPT = " ".join(["apple river stone"] * 30)


def test_strict_pair_identical_after_truncation_names_the_full_path(write_file, rm_tokenizer_dir):
    line = json.dumps({"prompt": LONG_PROMPT, "chosen": "same start then a", "rejected": "same start then b"})
    path = write_file("p.jsonl", json.dumps({"prompt": "hi", "chosen": "a b", "rejected": "c d"}), line)
    cfg = DataConfig(sources=[SourceConfig(name="pairs", format="jsonl", path=str(path))], pack=False,
                     max_seq_len=16, val_fraction=0.0, strict=True)
    with pytest.raises(UnusableRecord) as error:
        build_preference_dataset(cfg, Tokenizer.from_dir(rm_tokenizer_dir), seed=0)
    assert str(error.value).startswith(f"{path}:2: expected 'chosen' and 'rejected' to differ within ")
    assert len(read_preference_jsonl(path)) == 2  # both read; the second is cut to one sequence
