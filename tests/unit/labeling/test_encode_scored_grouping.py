"""`encode_scored` encodes the answers to one prompt together (the prompt once, as `label`
scores generate's n samples per prompt; it used to encode the prompt once per answer), and
gives exactly the samples of `encode_sft` on each pair alone: on real hh-rlhf prompts and
answers, shuffled so one prompt's answers are not neighbours, some cut before their end,
some prompts multi-turn, under the paper's template and a chat template, with cuts."""

from __future__ import annotations

import random

import pytest

from offline_rlhf.config.schema import TemplateConfig
from offline_rlhf.data.chat_template import build_template
from offline_rlhf.data.preference_readers import read_hh_rlhf
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import SYSTEM, USER, ChatTemplate, split_system
from offline_rlhf.data.tokenize import encode_sft
from offline_rlhf.data.tokenizer import train_bpe_tokenizer
from offline_rlhf.labeling.scoring import encode_scored
from tests.fixtures import SHARED_DATA
from tests.unit.data.test_chat_template import CHATML, SPECIALS


@pytest.fixture(scope="module")
def scored():
    """(prompt, answer, finished, turns) rows: each hh-rlhf conversation's two answers and a
    third, every fourth conversation scored with its turns, every fourth but one with a system
    turn before its prompt, in a shuffled order."""
    pairs = read_hh_rlhf(SHARED_DATA / "hh-rlhf" / "harmless-base" / "test-dev.jsonl", skips=Skips())[:120]
    rows = []
    for index, pair in enumerate(pairs):
        turns = pair.turns if index % 4 == 0 else ((SYSTEM, "Be brief."), (USER, pair.prompt)) if index % 4 == 1 else ()
        prompt = ChatTemplate().fold_history(turns) if index % 4 == 1 else pair.prompt
        for answer, finished in ((pair.chosen, True), (pair.rejected, index % 3 != 0), (pair.chosen[:40], False)):
            rows.append((prompt, answer, finished, turns))
    random.Random(0).shuffle(rows)
    assert sum(bool(turns) for *_, turns in rows) > 50
    return rows


def trained_tokenizer(scored, folder):
    (folder / "corpus.txt").write_text("\n".join(f"{prompt} {answer}" for prompt, answer, *_ in scored))
    return train_bpe_tokenizer([folder / "corpus.txt"], 2000, folder / "tok", special_tokens=SPECIALS)


@pytest.fixture(scope="module", params=["paper", "chatml"])
def setup(request, scored, tmp_path_factory):
    tokenizer = trained_tokenizer(scored, tmp_path_factory.mktemp("tok"))
    if request.param == "chatml":
        tokenizer.config["chat_template"] = CHATML
        return tokenizer, build_template(TemplateConfig(kind="chat"), tokenizer.config)
    return tokenizer, ChatTemplate()


@pytest.mark.parametrize("max_len", [40, 1024])
def test_answers_encoded_together_are_each_pair_encoded_alone(setup, scored, max_len):
    tokenizer, template = setup
    got = encode_scored(tokenizer, template, [(prompt, answer) for prompt, answer, *_ in scored], max_len,
                        finished=[finished for *_, finished, _ in scored], turns=[turns for *_, turns in scored],
                        progress=False)
    alone = [encode_sft(tokenizer, template, prompt, answer, max_len, f"pair {index}", eos=finished, turns=turns)
             for index, (prompt, answer, finished, turns) in enumerate(scored)]
    assert [(s.input_ids, s.labels, s.source, s.truncated) for s in got] == \
        [(s.input_ids, s.labels, s.source, s.truncated) for s in alone]
    assert any(s.truncated for s in got) == (max_len == 40)


def test_a_prompt_is_encoded_once_for_all_its_answers(scored, tmp_path, monkeypatch):
    """The paper's template encodes prompt and answer apart (a chat template renders them as
    one text: nothing to share there); a system turn before the one user turn too."""
    tokenizer, template = trained_tokenizer(scored, tmp_path), ChatTemplate()
    single = [row for row in scored if len(split_system(row[3])[1]) <= 1]
    assert any(turns for *_, turns in single)
    encoded = []
    original = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text, **kw: encoded.append(text) or original(text, **kw))
    encode_scored(tokenizer, template, [(prompt, answer) for prompt, answer, *_ in single], 1024,
                  turns=[turns for *_, turns in single], progress=False)
    prompts = {template.prompt_text(prompt) for prompt, *_ in single}
    assert sum(text in prompts for text in encoded) == len(prompts) < len(single)
