import pickle
import subprocess
import sys

import pytest

from offline_rlhf.data.errors import DataError, Location, UnusableRecord
from offline_rlhf.data.records import (
    iter_json_objects,
    iter_lines,
    iter_tsv_rows,
    optional_turns,
    record_turns,
    select_reader,
)


def test_data_error_message_names_file_record_and_expectation():
    error = DataError("data.jsonl", 17, "expected an object with key 'response' (missing)")
    assert str(error) == "data.jsonl:17: expected an object with key 'response' (missing)"
    assert isinstance(error, ValueError)


def test_data_error_survives_pickling():
    error = pickle.loads(pickle.dumps(DataError("data.jsonl", 3, "expected x")))
    assert (error.source, error.record, str(error)) == ("data.jsonl", 3, "data.jsonl:3: expected x")


def test_lines_are_numbered_from_one_and_blank_lines_skipped(write_file):
    path = write_file("a.jsonl", "{}", "", "  ", '{"k": 1}')
    assert [(where.record, text) for where, text in iter_lines(path)] == [(1, "{}"), (4, '{"k": 1}')]


def test_json_strings_may_hold_unicode_line_separators(write_file):
    # U+2028 is legal unescaped inside a JSON string and must not split the line.
    path = write_file("a.jsonl", '{"k": "one\u2028two"}')
    assert [record for _, record in iter_json_objects(path)] == [{"k": "one\u2028two"}]


def test_crlf_line_endings_are_removed(write_file):
    path = write_file("a.tsv", "q\ta\tr\r")
    assert [row for _, row in iter_tsv_rows(path, ("x", "y", "z"))] == [{"x": "q", "y": "a", "z": "r"}]


def test_invalid_utf8_is_reported_with_its_line(write_file):
    path = write_file("bad.jsonl", "{}", b'{"k": "\xff"}')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected UTF-8 text \(invalid byte 0xff"):
        list(iter_lines(path))


def test_empty_or_blank_file_has_no_records(write_file, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    for path in (empty, write_file("blank.jsonl", "", " ")):
        with pytest.raises(DataError, match=rf"{path.name}: expected at least one record \(no records\)"):
            list(iter_lines(path))


def test_json_array_line_is_not_an_object(write_file):
    path = write_file("a.jsonl", "[1, 2]")
    with pytest.raises(DataError, match=r"a\.jsonl:1: expected a JSON object \(got list\)"):
        list(iter_json_objects(path))


HERE = Location("samples.jsonl", 3)
CONVERSATION = [["user", "Hi"], ["assistant", "Hello!"], ["user", "Name a fruit."]]


@pytest.mark.parametrize("blank", [1, 2])
def test_a_blank_turn_makes_a_record_unusable_not_malformed(blank):
    turns = [list(turn) for turn in CONVERSATION]
    turns[blank][1] = "  "
    with pytest.raises(UnusableRecord, match=rf"^samples\.jsonl:3: expected every turn of 'turns' to have text "
                                             rf"\(turn {blank + 1} is blank\)") as caught:
        optional_turns({"turns": turns}, HERE)
    assert caught.value.reason == "blank 'turns' turn"
    # Wrong roles stay malformed even beside a blank text.
    turns[0][0] = "assistant"
    with pytest.raises(DataError, match="expected turn 1 to be 'user'") as caught:
        optional_turns({"turns": turns}, HERE)
    assert not isinstance(caught.value, UnusableRecord)


def test_generic_files_read_turns_only_as_role_text_pairs():
    assert record_turns({"turns": CONVERSATION}, HERE) == tuple(tuple(turn) for turn in CONVERSATION)
    assert record_turns({"turns": ["Write a poem.", "Now shorter."]}, HERE) == ()  # a FastChat question
    assert record_turns({"turns": None}, HERE) == record_turns({}, HERE) == ()  # a dataset row without them
    assert record_turns({"turns": [["user", "Hi"]]}, HERE) == ()  # one user turn: the prompt itself
    with pytest.raises(DataError, match=r"samples\.jsonl:3: expected 'turns' to be a list of \[role, text\] pairs"):
        record_turns({"turns": [{"role": "user", "content": "Hi"}]}, HERE)


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown data format 'csv'; expected one of \['a', 'b'\]"):
        select_reader({"b": len, "a": len}, "csv")


def test_the_data_package_imports_without_torch():
    # Style principle 9: data/ stays light; check in a fresh interpreter, since pytest may hold torch.
    code = ("import sys, offline_rlhf.data.sft_readers, offline_rlhf.data.preference_readers; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
