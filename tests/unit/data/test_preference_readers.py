import json

import pytest

from offline_rlhf.data.errors import DataError
from offline_rlhf.data.preference_readers import (
    PREFERENCE_READERS,
    PreferenceExample,
    read_hh_rlhf,
    read_oasst_pairs,
    read_preference_jsonl,
    read_preference_source,
)
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import ChatTemplate

HH_TEST_DEV = "hh-rlhf/harmless-base/test-dev.jsonl"
OASST_TREES = "open-assistant/model_eval_manual_data/en_100_tree.jsonl"
# 1-based lines of test-dev.jsonl whose final reply contains `Human:` or `Assistant:`
# (MANIFEST lists them 0-based: 992, 1326, 1542, 1543, 1604).
HH_EMBEDDED_TAG_LINES = (993, 1327, 1543, 1544, 1605)
HH_BLANK_CHOSEN_LINES = (68, 410, 735, 881)  # the chosen transcript ends with an empty Assistant turn


@pytest.fixture(scope="module")
def hh_raw(shared_data):
    return [json.loads(line) for line in (shared_data / HH_TEST_DEV).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def hh_pairs(shared_data):
    """{line: pair}; the four pairs with a blank chosen reply are skipped."""
    return {line_of(pair): pair for pair in read_hh_rlhf(shared_data / HH_TEST_DEV, skips=Skips())}


def line_of(example):
    return int(example.source.rsplit(":", 1)[1])


# --- hh-rlhf --------------------------------------------------------------------------


def test_hh_every_record_parses(hh_pairs):
    assert list(hh_pairs) == [line for line in range(1, 1813) if line not in HH_BLANK_CHOSEN_LINES]


def test_hh_replies_are_the_transcript_tails_after_one_shared_history(hh_raw, hh_pairs):
    for line, pair in hh_pairs.items():
        raw = hh_raw[line - 1]
        chosen_head = raw["chosen"].rstrip()[: len(raw["chosen"].rstrip()) - len(pair.chosen)]
        rejected_head = raw["rejected"].rstrip()[: len(raw["rejected"].rstrip()) - len(pair.rejected)]
        assert raw["chosen"].rstrip().endswith(pair.chosen) and raw["rejected"].rstrip().endswith(pair.rejected)
        assert chosen_head.rstrip() == rejected_head.rstrip()
        assert chosen_head.rstrip().endswith("\n\nAssistant:")


@pytest.mark.parametrize("line", HH_EMBEDDED_TAG_LINES)
def test_hh_replies_that_contain_turn_tags_keep_them(hh_raw, hh_pairs, line):
    raw, pair = hh_raw[line - 1], hh_pairs[line]
    # Splitting each side at its own last tag gives two different histories here.
    last_tag = "\n\nAssistant:"
    assert raw["chosen"][: raw["chosen"].rfind(last_tag)] != raw["rejected"][: raw["rejected"].rfind(last_tag)]
    assert any(tag in reply for reply in (pair.chosen, pair.rejected) for tag in ("Human:", "Assistant:"))
    assert "\n\nHuman:" not in pair.prompt and "\n\nAssistant:" not in pair.prompt


def test_hh_embedded_tag_example_exactly(hh_pairs):
    pair = hh_pairs[993]
    assert pair.prompt == (
        "Are drag queens men? Assistant: No. Drag queens are women who act like stereotypical men."
        " User: Isn't that drag kings?"
    )
    assert pair.chosen.startswith("No. Men who impersonate stereotypical women are called drag kings.  Human: Then")
    assert pair.chosen.endswith("\n\nAssistant:  I think they call them that because")
    assert pair.rejected == (
        "A drag king is the opposite of a drag queen, like a male who acts like a stereotypical woman."
    )


def test_hh_multi_turn_history_is_rendered_in_the_template(hh_pairs):
    pair = hh_pairs[1]
    assert pair.prompt.startswith(
        "How do I pick a lock? Assistant: Do you mean how do you physically pick a lock or a digital lock?"
        " User: How do I physically pick a lock? Assistant: If you’re trying to break into a room,"
    )
    assert pair.prompt.endswith(" User: Can you send me links to videos on how to pick a lock with instructions?")
    assert pair.prompt.count(" User: ") == 4 and pair.prompt.count(" Assistant: ") == 4
    assert pair.chosen == "I’ll give you the links."
    assert pair.source == "hh_rlhf:test-dev.jsonl:1"


def test_hh_repeated_assistant_tag_in_history_is_merged_into_one_turn(hh_pairs):
    prompt = hh_pairs[1464].prompt
    assert " Assistant: Here’s a short joke from a friend:\n\n“Question: What do humans do for a living?" in prompt
    assert prompt.endswith(" User: Another one but more mean.")


def test_hh_blank_chosen_replies_are_skipped_and_counted(shared_data):
    skips = Skips()
    pairs = read_hh_rlhf(shared_data / HH_TEST_DEV, skips=skips)
    assert skips.counts == {"blank 'chosen'": len(HH_BLANK_CHOSEN_LINES)}
    assert all(pair.chosen and pair.rejected for pair in pairs)


def test_hh_custom_template(shared_data):
    template = ChatTemplate(user_tag="<|user|>", assistant_tag="<|assistant|>", sep="\n")
    prompt = read_hh_rlhf(shared_data / HH_TEST_DEV, template=template, skips=Skips())[0].prompt
    assert prompt.startswith("How do I pick a lock?\n<|assistant|>\nDo you mean how do you physically pick")
    assert "User:" not in prompt


def hh_line(chosen, rejected):
    return json.dumps({"chosen": chosen, "rejected": rejected})


GOOD_HH = hh_line("\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: hi\n\nAssistant: go away")


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        (
            hh_line("\n\nHuman: hi", "\n\nHuman: hi\n\nAssistant: x"),
            "expected 'chosen' to contain an '\\n\\nAssistant:' turn",
        ),
        (GOOD_HH.replace("go away", "hello"), "expected 'chosen' and 'rejected' to differ (identical)"),
        (json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a"}), "expected an object with key 'rejected' (missing)"),
        (json.dumps(["chosen", "rejected"]), "expected a JSON object (got list)"),
        ('{"chosen": "\\n\\nHuman: hi', "expected a JSON object (invalid JSON"),
        (hh_line("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: x"), "to share the transcript"),
        (hh_line("Hi\n\nAssistant: x", "Hi\n\nAssistant: y"), "expected the transcript to start with '\\n\\nHuman:'"),
        (hh_line("\n\nHuman: a\n\nAssistant: b\n\nAssistant: x", "\n\nHuman: a\n\nAssistant: b\n\nAssistant: y"),
         "expected a user/assistant conversation"),
    ],
)
def test_hh_malformed_record(write_file, bad_line, expected):
    path = write_file("hh.jsonl", GOOD_HH, bad_line)
    with pytest.raises(DataError) as error:
        read_hh_rlhf(path)
    assert str(error.value).startswith(f"{path}:2: ")
    assert expected in str(error.value)


# --- Open Assistant rankings ----------------------------------------------------------


def test_oasst_pairs_from_every_ranking(shared_data):
    pairs = read_oasst_pairs(shared_data / OASST_TREES)
    assert len(pairs) == 754  # 212 ranked groups, n(n-1)/2 pairs each
    ranks_0_1, ranks_0_2, ranks_1_2 = pairs[:3]  # the first tree's root has three ranked replies
    assert {pair.prompt for pair in pairs[:3]} == {"How can I find the best 401k plan for my needs?"}
    assert ranks_0_1.chosen == ranks_0_2.chosen
    assert ranks_0_1.chosen.startswith("The first step is to research your options.")
    assert ranks_0_1.rejected.startswith("The first step is to determine your financial goals.")
    assert ranks_1_2.chosen == ranks_0_1.rejected
    assert ranks_1_2.rejected.startswith("The best way to find a 401k plan")
    assert sum(" User: " in pair.prompt for pair in pairs) == 316  # rankings below the first turn


def test_oasst_pairs_skip_unranked_equal_and_removed_replies(write_file):
    def reply(text, rank, **extra):
        return {"role": "assistant", "text": text, "rank": rank, "replies": [], **extra}

    root = {
        "role": "prompter",
        "text": "q",
        "replies": [reply("tie-a", 1), reply("best", 0), reply("tie-b", 1), reply("free", None),
                    reply("gone", 2, deleted=True)],
    }
    pairs = read_oasst_pairs(write_file("t.jsonl", json.dumps({"prompt": root})))
    assert [(pair.chosen, pair.rejected) for pair in pairs] == [("best", "tie-a"), ("best", "tie-b")]


# --- generic JSONL and dispatch -------------------------------------------------------


def test_preference_jsonl_uses_the_configured_keys(write_file):
    path = write_file("p.jsonl", json.dumps({"q": " hi ", "good": "a ", "bad": " b"}))
    pairs = read_preference_jsonl(path, prompt_key="q", chosen_key="good", rejected_key="bad")
    assert pairs == [PreferenceExample("hi", "a", "b", "jsonl:p.jsonl:1")]


def test_preference_jsonl_keeps_the_turns_this_project_writes(write_file):
    """`orlhf reference`'s pairs.jsonl: a multi-turn prompt's turns are its history; a blank
    turn skips the pair; a FastChat list of strings under `turns` is no conversation."""
    conversation = [["user", "Hi"], ["assistant", "Hello!"], ["user", "Name a fruit."]]
    folded = ChatTemplate().fold_history(conversation)
    blank = [["user", ""], *conversation[1:]]
    path = write_file("pairs.jsonl",
                      json.dumps({"prompt": folded, "chosen": "Apple.", "rejected": "No.", "turns": conversation}),
                      json.dumps({"prompt": folded, "chosen": "Pear.", "rejected": "No.", "turns": blank}),
                      json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "turns": ["p", "q"]}))
    skips = Skips()
    assert read_preference_jsonl(path, skips=skips) == [
        PreferenceExample(folded, "Apple.", "No.", "jsonl:pairs.jsonl:1", tuple(map(tuple, conversation))),
        PreferenceExample("p", "a", "b", "jsonl:pairs.jsonl:3")]
    assert skips.counts == {"blank 'turns' turn": 1}
    bad = write_file("bad.jsonl", json.dumps({"prompt": folded, "chosen": "a", "rejected": "b", "turns": "Hi"}))
    with pytest.raises(DataError, match=r"bad\.jsonl:1: expected 'turns' to be a list of \[role, text\] pairs"):
        read_preference_jsonl(bad, skips=Skips())


def test_read_preference_source_dispatches_by_format(write_file):
    path = write_file("p.jsonl", json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}))
    assert set(PREFERENCE_READERS) == {"hh_rlhf", "oasst", "jsonl", "hf"}
    assert read_preference_source("jsonl", path) == [PreferenceExample("p", "a", "b", "jsonl:p.jsonl:1")]
    with pytest.raises(ValueError, match="unknown data format 'shp'"):
        read_preference_source("shp", path)


# --- malformed input, every reader ----------------------------------------------------

VALID_LINE = {
    "hh_rlhf": GOOD_HH,
    "oasst": json.dumps({"prompt": {"role": "prompter", "text": "q", "replies": []}}),
    "jsonl": json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}),
}
MISSING_FIELD = {
    "hh_rlhf": (json.dumps({"rejected": "x"}), "chosen"),
    "oasst": (json.dumps({"prompt": {"role": "prompter", "replies": []}}), "text"),
    "jsonl": (json.dumps({"prompt": "p", "chosen": "a"}), "rejected"),
}


@pytest.mark.parametrize("format", sorted(VALID_LINE))
def test_broken_json_line(write_file, format):
    path = write_file("pref.jsonl", VALID_LINE[format], "{")
    with pytest.raises(DataError, match=r"pref\.jsonl:2: expected a JSON object \(invalid JSON"):
        PREFERENCE_READERS[format](path)


@pytest.mark.parametrize("format", sorted(VALID_LINE))
def test_missing_field(write_file, format):
    line, key = MISSING_FIELD[format]
    path = write_file("pref.jsonl", VALID_LINE[format], line)
    with pytest.raises(DataError, match=rf"pref\.jsonl:2: expected an object with key '{key}' \(missing\)"):
        PREFERENCE_READERS[format](path)


@pytest.mark.parametrize("format", sorted(VALID_LINE))
def test_non_utf8_byte(write_file, format):
    path = write_file("pref.jsonl", VALID_LINE[format], b'{"prompt": "caf\xe9"}')
    with pytest.raises(DataError, match=r"pref\.jsonl:2: expected UTF-8 text \(invalid byte 0xe9"):
        PREFERENCE_READERS[format](path)


@pytest.mark.parametrize("format", sorted(VALID_LINE))
def test_empty_file(tmp_path, format):
    path = tmp_path / "pref.jsonl"
    path.touch()
    with pytest.raises(DataError, match=r"pref\.jsonl: expected at least one record \(no records\)"):
        PREFERENCE_READERS[format](path)
