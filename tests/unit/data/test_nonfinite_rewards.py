"""NaN and Infinity rewards, and wrongly typed labeled records, are DataErrors naming
file:line. Python's json reads NaN/Infinity, so they used to reach training (MLE dropped
NaN and kept +Inf, DT trained on `<rm_score> nan`) and crashed `orlhf mix`."""

import json

import pytest

from offline_rlhf.data.alignment_dataset import read_labeled
from offline_rlhf.data.errors import DataError
from offline_rlhf.labeling.mix import read_labeled_records

GOOD = json.dumps({"prompt": "p", "response": "r", "reward": 0.5})


@pytest.mark.parametrize("literal,shown", [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf"),
                                           ("1e400", "inf"), ("1" + "0" * 400, "inf")])
def test_non_finite_reward_names_file_and_line(write_file, literal, shown):
    path = write_file("labeled.jsonl", GOOD, '{"prompt": "p", "response": "r", "reward": %s}' % literal)
    with pytest.raises(DataError) as err:
        read_labeled(path)
    assert str(err.value) == f"{path}:2: expected 'reward' to be a finite number (got {shown})"


def test_finite_rewards_still_read(write_file):
    path = write_file("labeled.jsonl", GOOD, '{"prompt": "p", "response": "r", "reward": -3}')
    assert [e.reward for e in read_labeled(path)] == [0.5, -3.0]


def labeled(**fields):
    return json.dumps({"prompt": "p", "response": "r", "kind": "generated", "source": "gen", "reward": 0.1, **fields})


@pytest.mark.parametrize("line,expected", [
    ('{"prompt": "p", "response": "r", "kind": "sft", "source": "s", "reward": NaN}',
     "expected 'reward' to be a finite number (got nan)"),
    (labeled(reward="0.5"), "expected 'reward' to be a number (got str)"),
    (labeled(prompt=3), "expected 'prompt' to be str (got int)"),
    (labeled(response=["r"]), "expected 'response' to be str (got list)"),
    (labeled(source=None), "expected 'source' to be str (got NoneType)"),
    (labeled(kind="weird"), "expected 'kind' to be one of generated, sft, chosen, rejected (got 'weird')"),
    (labeled(kind="chosen"), "expected a chosen record to have an integer 'pair' (the preference pair index; "
                             "got nothing)"),
    (labeled(kind="rejected", pair="1"), "expected a rejected record to have an integer 'pair' (the preference "
                                         "pair index; got str)"),
])
def test_mix_input_is_checked_before_it_is_copied(write_file, line, expected):
    """Each used to be a traceback (KeyError, AttributeError, TypeError) in `orlhf mix`, or
    a wrong record copied into alignment.jsonl."""
    path = write_file("labeled.jsonl", labeled(), line)
    with pytest.raises(DataError) as err:
        read_labeled_records(str(path))
    assert str(err.value) == f"{path}:2: {expected}"


def test_mix_input_of_every_kind_reads(write_file):
    path = write_file("labeled.jsonl", labeled(), labeled(kind="sft"), labeled(kind="chosen", pair=0),
                      labeled(kind="rejected", pair=0, reward_raw=1.5))
    assert [r["kind"] for r in read_labeled_records(str(path))] == ["generated", "sft", "chosen", "rejected"]
