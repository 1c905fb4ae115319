"""Held-out prompt files: `{prompt_key: text}` records, or FastChat question files whose
`turns` list gives its first turn (what `orlhf eval` answers and `orlhf judge` grades)."""

import json
from pathlib import Path

import pytest

from offline_rlhf.data.errors import DataError
from offline_rlhf.data.prompts import read_prompt_file

MT_BENCH = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "fastchat" / "llm_judge" / "data" / \
    "mt_bench" / "question.jsonl"


def test_fastchat_questions_give_their_first_turn():
    questions = [json.loads(line) for line in MT_BENCH.read_text().splitlines()]
    prompts = read_prompt_file(str(MT_BENCH), "turns")
    assert len(prompts) == len(questions) == 80
    assert prompts == [q["turns"][0] for q in questions]


def test_text_records_and_bad_records(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": " hi "}) + "\n" + json.dumps({"text": []}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2"):
        read_prompt_file(str(path), "text")
    path.write_text(json.dumps({"text": "hi"}) + "\n" + json.dumps({"text": ["first", "second"]}) + "\n")
    assert read_prompt_file(str(path), "text") == ["hi", "first"]
