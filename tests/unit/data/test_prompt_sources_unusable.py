"""Generation needs only a record's prompt: an SFT example with a blank response or a
preference pair with identical sides still gives its prompt; a blank prompt is skipped and
counted per source (strict: an error naming file:line), as the other stages count theirs."""

import json

import pytest

from offline_rlhf.config.samples import PromptSourceConfig
from offline_rlhf.data.errors import DataError
from offline_rlhf.data.prompts import read_prompt_mix
from offline_rlhf.data.sft_readers import read_sft_source
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import ChatTemplate

TEMPLATE = ChatTemplate()
CONVERSATION = [["user", "Hi"], ["assistant", "Hello!"], ["user", "Name a fruit."]]


def jsonl(path, *records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture
def sources(tmp_path):
    sft = jsonl(tmp_path / "sft_blank.jsonl", {"prompt": "Write a haiku.", "response": "Leaves fall."},
                {"prompt": "Name a color.", "response": "  "},  # only training cannot use it
                {"prompt": "folded", "turns": CONVERSATION, "response": "Apple."})
    pairs = jsonl(tmp_path / "pairs.jsonl", {"prompt": "Say yes.", "chosen": "yes", "rejected": "yes"},
                  {"prompt": "Count to 2.", "chosen": "1 2", "rejected": 3})  # the replies do not matter
    asked = jsonl(tmp_path / "prompts.jsonl", {"q": "What is a cat?"}, {"q": " "}, {"q": "Why?"})
    return [PromptSourceConfig(name="sft", kind="sft", path=sft),
            PromptSourceConfig(name="pref", kind="preference", path=pairs),
            PromptSourceConfig(name="mine", kind="prompts", path=asked, prompt_key="q")]


def test_prompts_of_records_unusable_for_training_are_generated_and_blank_prompts_counted(sources):
    prompts, stats = read_prompt_mix(sources, TEMPLATE, None, seed=0, strict=False)
    folded = TEMPLATE.fold_history(CONVERSATION)
    assert sorted((p.source, p.text, p.turns) for p in prompts) == sorted([
        ("sft", "Write a haiku.", ()), ("sft", "Name a color.", ()), ("sft", folded, tuple(map(tuple, CONVERSATION))),
        ("pref", "Say yes.", ()), ("pref", "Count to 2.", ()), ("mine", "What is a cat?", ()), ("mine", "Why?", ())])
    assert {name: s["skipped"] for name, s in stats.items()} == {"sft": {}, "pref": {}, "mine": {"blank 'q'": 1}}
    assert [p.id for p in prompts] == list(range(7))


def test_a_jsonl_prompt_is_the_sft_readers_prompt(sources):
    """The prompt-only read folds a record as the SFT reader does (what the model was trained on)."""
    prompts, _ = read_prompt_mix(sources[:1], TEMPLATE, None, seed=0, strict=False)
    trained = [(e.prompt, e.turns) for e in read_sft_source("jsonl", sources[0].path, template=TEMPLATE, skips=Skips())]
    assert len(trained) == 2  # the blank response's example is not trained on, but its prompt is answered
    assert set(trained) < {(p.text, p.turns) for p in prompts}


def test_strict_names_the_blank_prompt_and_a_source_of_blanks_only_is_an_error(sources, tmp_path):
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: expected 'q' to be non-empty text \(blank\)"):
        read_prompt_mix(sources, TEMPLATE, None, seed=0, strict=True)
    blank = PromptSourceConfig(name="blank", kind="prompts", path=jsonl(tmp_path / "blank.jsonl", {"prompt": ""}))
    with pytest.raises(DataError, match=r"blank\.jsonl: expected at least one usable prompt \(1 skipped \(1 blank "
                                        r"'prompt'\); strict=true names the first\)"):
        read_prompt_mix([blank], TEMPLATE, None, seed=0, strict=False)


def test_a_malformed_prompt_stays_an_error(tmp_path):
    source = PromptSourceConfig(kind="sft", path=jsonl(tmp_path / "bad.jsonl", {"prompt": 7, "response": ""}))
    with pytest.raises(DataError, match=r"bad\.jsonl:1: expected 'prompt' to be str \(got int\)"):
        read_prompt_mix([source], TEMPLATE, None, seed=0, strict=False)
