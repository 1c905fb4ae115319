import json

import pytest

from offline_rlhf.data.errors import DataError
from offline_rlhf.data.sft_readers import (
    READERS,
    SFTExample,
    read_dolly,
    read_flan_cot,
    read_jsonl,
    read_oasst,
    read_self_instruct,
    read_sft_source,
)
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import ChatTemplate

OASST_TREES = "open-assistant/model_eval_manual_data/en_100_tree.jsonl"
SEED_TASKS = "self-instruct/data/seed_tasks.jsonl"
FLAN_COT_ROWS = {
    "aqua_train.tsv": 2728,
    "creak_train.tsv": 6915,
    "ecqa_train.tsv": 7112,
    "gsm8k_train.tsv": 7473,
    "qasc_train.tsv": 1084,
    "sensemaking_train.tsv": 6070,
    "strategyqa_train.tsv": 2061,
}


def message(role, text, rank=None, replies=(), **extra):
    return {"role": role, "text": text, "rank": rank, "replies": list(replies), **extra}


def tree(root):
    return json.dumps({"message_tree_id": "t", "prompt": root})


# --- Open Assistant -------------------------------------------------------------------


def test_oasst_yields_one_example_per_assistant_message_on_the_best_ranked_path(shared_data):
    examples = read_oasst(shared_data / OASST_TREES)
    assert len(examples) == 142
    assert {example.source.rsplit(":", 1)[1] for example in examples} == {str(n) for n in range(1, 101)}
    first = examples[0]
    assert first.prompt == "How can I find the best 401k plan for my needs?"
    assert first.response.startswith("The first step is to research your options.")  # rank 0 of 3
    assert first.source == "oasst:en_100_tree.jsonl:1"


def test_oasst_multi_turn_prompt_folds_the_history(shared_data):
    second_turn = read_oasst(shared_data / OASST_TREES)[2]
    assert second_turn.source == "oasst:en_100_tree.jsonl:2"
    assert second_turn.prompt.startswith(
        "How to protect my eyes when I have to stare at my computer screen for longer than 10 hours every day?"
        " Assistant: Your eyes are not designed to stare"
    )
    assert second_turn.prompt.endswith(" User: Are blue light blocking glasses also effective?")
    assert second_turn.response.startswith("There is no scientific research to prove that blue light")


def test_oasst_follows_rank_then_first_unranked_and_skips_removed_messages(write_file):
    root = message(
        "prompter",
        "q1",
        replies=[
            message("assistant", "deleted", rank=0, deleted=True),
            message("assistant", "second", rank=2),
            message("assistant", "best", rank=1, replies=[
                message("prompter", "failed review", review_result=False),
                message("prompter", "q2", replies=[message("assistant", "a2")]),
                message("prompter", "other q2"),
            ]),
        ],
    )
    examples = read_oasst(write_file("t.jsonl", tree(root)))
    assert [(e.prompt, e.response) for e in examples] == [("q1", "best"), ("q1 Assistant: best User: q2", "a2")]


def test_oasst_broken_alternation_is_a_data_error(write_file):
    root = message("prompter", "q1", replies=[message("prompter", "q2", replies=[message("assistant", "a")])])
    with pytest.raises(DataError, match=r"t\.jsonl:1: expected a user/assistant conversation"):
        read_oasst(write_file("t.jsonl", tree(root)))


# --- Dolly (no real records are staged: only an LFS pointer) ----------------------------


def dolly_record(context="", response="Paris."):
    return json.dumps(
        {"instruction": "What is the capital of France?", "context": context, "response": response, "category": "qa"}
    )


def test_dolly_folds_a_non_empty_context_after_a_blank_line(write_file):
    path = write_file("dolly.jsonl", dolly_record(), dolly_record(context=" France is in Europe. "))
    assert read_dolly(path) == [
        SFTExample("What is the capital of France?", "Paris.", "dolly:dolly.jsonl:1"),
        SFTExample("What is the capital of France?\n\nFrance is in Europe.", "Paris.", "dolly:dolly.jsonl:2"),
    ]


def test_dolly_blank_response_is_rejected(write_file):
    with pytest.raises(DataError, match=r"dolly\.jsonl:1: expected 'response' to be non-empty text"):
        read_dolly(write_file("dolly.jsonl", dolly_record(response="  ")))


# --- Flan v2 chain of thought ---------------------------------------------------------


@pytest.mark.parametrize("name, rows", sorted(FLAN_COT_ROWS.items()))
def test_flan_cot_reads_every_row(shared_data, name, rows):
    assert len(read_flan_cot(shared_data / "flan-v2" / "cot_data" / name)) == rows


def test_flan_cot_response_is_rationale_then_answer(shared_data):
    first = read_flan_cot(shared_data / "flan-v2/cot_data/gsm8k_train.tsv")[0]
    assert first.prompt.startswith("Natalia sold clips to 48 of her friends in April")
    assert first.response == (
        "Natalia sold 48 / 2 = 24 clips in May. Natalia sold 48 + 24 = 72 clips altogether in April and May."
        " So the answer is 72."
    )


def test_flan_cot_escaped_newlines_become_newlines(shared_data):
    first = read_flan_cot(shared_data / "flan-v2/cot_data/aqua_train.tsv")[0]
    assert first.prompt.endswith("?\nOptions:\n(A) 300\n(B) 992\n(C) 1120\n(D) 552\n(E) 312")
    assert first.response == "1/7:1/7:1/14 = 2:2:1\n1/5*5600 = 1120\n2240-1120 = 1120 So the answer is (C)."


# --- self-instruct --------------------------------------------------------------------


def test_self_instruct_one_example_per_instance_with_input_folded(shared_data):
    examples = read_self_instruct(shared_data / SEED_TASKS)
    assert len(examples) == 175  # every seed task has exactly one instance
    assert sum("\n\n" in example.prompt for example in examples) == 125  # the instances with an input
    assert examples[0].prompt.startswith("Is there anything I can eat for a breakfast that doesn't include eggs")
    assert examples[1] == SFTExample(
        "What is the relation between the given pairs?\n\nNight : Day :: Right : Left",
        "The relation between the given pairs is that they are opposites.",
        "self_instruct:seed_tasks.jsonl:2",
    )


def test_self_instruct_several_instances_give_several_examples(write_file):
    task = {"instruction": "Add.", "instances": [{"input": "1+1", "output": "2"}, {"input": "", "output": "0"}]}
    path = write_file("seed.jsonl", json.dumps(task))
    assert [(e.prompt, e.response) for e in read_self_instruct(path)] == [("Add.\n\n1+1", "2"), ("Add.", "0")]


# --- generic JSONL, Hugging Face, dispatch --------------------------------------------


def test_jsonl_reader_uses_the_configured_keys(write_file):
    path = write_file("x.jsonl", json.dumps({"q": " hi ", "a": "hello "}))
    assert read_jsonl(path, prompt_key="q", response_key="a") == [SFTExample("hi", "hello", "jsonl:x.jsonl:1")]


CONVERSATION = [["user", "Hi"], ["assistant", "Hello!"], ["user", "Name a fruit."]]


def test_jsonl_records_keep_the_turns_this_project_writes(write_file):
    """`orlhf mix`'s alignment.jsonl: a multi-turn prompt's turns are its history (folded by
    the reader's template, as every reader folds); a blank turn skips the record; a FastChat
    list of strings under `turns` is no conversation."""
    folded, turns = ChatTemplate().fold_history(CONVERSATION), tuple(map(tuple, CONVERSATION))
    blank = [CONVERSATION[0], ["assistant", " "], CONVERSATION[2]]
    path = write_file("alignment.jsonl", json.dumps({"prompt": folded, "response": "Apple.", "turns": CONVERSATION}),
                      json.dumps({"prompt": folded, "response": "Pear.", "turns": blank}),
                      json.dumps({"prompt": "Hi", "response": "Hello.", "turns": ["Hi", "And then?"]}))
    skips = Skips()
    assert read_jsonl(path, skips=skips) == [SFTExample(folded, "Apple.", "jsonl:alignment.jsonl:1", turns),
                                             SFTExample("Hi", "Hello.", "jsonl:alignment.jsonl:3")]
    assert skips.counts == {"blank 'turns' turn": 1}
    qa = ChatTemplate(user_tag="Q:", assistant_tag="A:")
    assert read_jsonl(path, template=qa, skips=Skips())[0].prompt == "Hi A: Hello! Q: Name a fruit."
    repeated = [["user", "a"], ["user", "b"]]
    bad = write_file("bad.jsonl", json.dumps({"prompt": folded, "response": "x", "turns": repeated}))
    with pytest.raises(DataError, match=r"bad\.jsonl:1: expected 'turns' to be .*expected turn 2 to be 'assistant'"):
        read_jsonl(bad, skips=Skips())


def test_read_sft_source_dispatches_by_format(write_file):
    path = write_file("x.jsonl", json.dumps({"prompt": "p", "response": "r"}))
    assert set(READERS) == {"oasst", "dolly", "flan_cot", "self_instruct", "jsonl", "hf"}
    template = ChatTemplate(user_tag="Q:", assistant_tag="A:")
    assert read_sft_source("jsonl", path, template=template) == [SFTExample("p", "r", "jsonl:x.jsonl:1")]
    with pytest.raises(ValueError, match="unknown data format 'alpaca'"):
        read_sft_source("alpaca", path)


# --- malformed input, every reader ----------------------------------------------------

VALID_LINE = {
    "oasst": tree(message("prompter", "q", replies=[message("assistant", "a")])),
    "dolly": dolly_record(),
    "self_instruct": json.dumps({"instruction": "i", "instances": [{"input": "", "output": "o"}]}),
    "jsonl": json.dumps({"prompt": "p", "response": "r"}),
}
MISSING_FIELD = {
    "oasst": ('{"message_tree_id": "t"}', "prompt"),
    "dolly": (json.dumps({"instruction": "i", "context": ""}), "response"),
    "self_instruct": (json.dumps({"instruction": "i"}), "instances"),
    "jsonl": (json.dumps({"prompt": "p"}), "response"),
}


@pytest.mark.parametrize("format", sorted(VALID_LINE))
def test_broken_json_line(write_file, format):
    path = write_file("in.jsonl", VALID_LINE[format], '{"prompt": ')
    with pytest.raises(DataError, match=r"in\.jsonl:2: expected a JSON object \(invalid JSON"):
        READERS[format](path)


@pytest.mark.parametrize("format", sorted(VALID_LINE))
def test_missing_field(write_file, format):
    line, key = MISSING_FIELD[format]
    path = write_file("in.jsonl", VALID_LINE[format], line)
    with pytest.raises(DataError, match=rf"in\.jsonl:2: expected an object with key '{key}' \(missing\)"):
        READERS[format](path)


@pytest.mark.parametrize("format", sorted(VALID_LINE))
def test_non_utf8_byte(write_file, format):
    path = write_file("in.jsonl", VALID_LINE[format], VALID_LINE[format], b"\xc3\x28")
    with pytest.raises(DataError, match=r"in\.jsonl:3: expected UTF-8 text"):
        READERS[format](path)


@pytest.mark.parametrize("format", sorted(VALID_LINE) + ["flan_cot"])
def test_empty_file(tmp_path, format):
    path = tmp_path / "in.jsonl"
    path.touch()
    with pytest.raises(DataError, match=r"in\.jsonl: expected at least one record \(no records\)"):
        READERS[format](path)


def test_flan_cot_row_with_missing_column(write_file):
    path = write_file("cot.tsv", "q\ta\tr", "q\ta")
    expected = r"cot\.tsv:2: expected 3 tab-separated fields \(question, answer, rationale\), got 2"
    with pytest.raises(DataError, match=expected):
        read_flan_cot(path)


def test_flan_cot_non_utf8_byte(write_file):
    with pytest.raises(DataError, match=r"cot\.tsv:1: expected UTF-8 text"):
        read_flan_cot(write_file("cot.tsv", b"q\xff\ta\tr"))
