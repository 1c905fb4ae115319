"""Held-out prompt files: `{prompt_key: text}` records, or FastChat question files whose
`turns` list gives its first turn (what `orlhf eval` answers and `orlhf judge` grades)."""

import json
from pathlib import Path

import pytest

from offline_rlhf.data.errors import DataError
from offline_rlhf.data.prompts import read_prompt_file_turns, read_prompt_turns
from offline_rlhf.data.template import ChatTemplate

MT_BENCH = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "fastchat" / "llm_judge" / "data" / \
    "mt_bench" / "question.jsonl"


def test_fastchat_questions_give_their_first_turn():
    questions = [json.loads(line) for line in MT_BENCH.read_text().splitlines()]
    prompts = read_prompt_file_turns(str(MT_BENCH), "turns")
    assert len(prompts) == len(questions) == 80
    assert prompts == [(q["turns"][0], ()) for q in questions]


def test_text_records_and_bad_records(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": " hi "}) + "\n" + json.dumps({"text": []}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: expected 'text' to be text or a non-empty list of strings "
                                        r"\(an empty list\)"):
        read_prompt_file_turns(str(path), "text")
    path.write_text(json.dumps({"text": ["first", 2]}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: expected 'text' to be text or a list of strings \(a list "
                                        r"holding \['int'\]\)"):
        read_prompt_file_turns(str(path), "text")
    path.write_text(json.dumps({"text": "hi"}) + "\n" + json.dumps({"text": ["first", "second"]}) + "\n")
    assert read_prompt_file_turns(str(path), "text") == [("hi", ()), ("first", ())]


def test_records_this_project_writes_keep_their_turns(tmp_path):
    """generate's samples.jsonl (or label's output) as a prompt file: a multi-turn prompt
    comes with its turns, so a chat template renders the conversation, not its fold."""
    conversation = [["user", "Hi"], ["assistant", "Hello!"], ["user", "Name a fruit."]]
    folded = ChatTemplate().fold_history(conversation)
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"prompt": folded, "turns": conversation, "response": "Apple."}) + "\n" +
                    json.dumps({"prompt": "What is a cat?", "response": "An animal."}) + "\n")
    expected = [(folded, tuple(map(tuple, conversation))), ("What is a cat?", ())]
    assert read_prompt_file_turns(str(path)) == expected
    assert read_prompt_turns("prompts", "jsonl", str(path), ChatTemplate()) == expected  # generate and ppo's reader
    path.write_text(json.dumps({"prompt": folded, "turns": [["user", "Hi"], ["assistant", " "], ["user", "x"]]}))
    with pytest.raises(DataError, match=r"samples\.jsonl:1: expected every turn of 'turns' to have text"):
        read_prompt_file_turns(str(path))
