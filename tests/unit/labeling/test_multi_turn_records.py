"""A multi-turn prompt's `turns` travel with generated, labeled, mixed and pair records, and
every stage that encodes prompt + response renders them as SFT did: real messages under
`template.kind=chat`, folded with the template's own tags under the paper's (the folded
prompt's token ids when the tags match)."""

import json
import re

import pytest

from offline_rlhf.config.samples import PromptSourceConfig
from offline_rlhf.config.schema import TemplateConfig
from offline_rlhf.data.alignment_dataset import build_alignment_dataset
from offline_rlhf.data.chat_template import build_template
from offline_rlhf.data.errors import DataError, Location, UnusableRecord
from offline_rlhf.data.pair_dataset import encode_pair_example, pair_record, read_pair_example
from offline_rlhf.data.prompts import read_prompt_mix
from offline_rlhf.data.sft_readers import read_sft_source
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_prompt, encode_sft
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from offline_rlhf.labeling.mix import read_labeled_records
from offline_rlhf.labeling.normalize import labeled_records
from offline_rlhf.labeling.pairs import ranked_pairs
from offline_rlhf.labeling.samples import Sample, read_samples, selected_per_prompt
from offline_rlhf.labeling.scoring import encode_scored
from tests.local_data import OASST_TREES
from tests.unit.data.test_chat_template import CHATML

PAPER = ChatTemplate()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A BPE tokenizer with ChatML's markers and chat template, trained on the OASST trees."""
    folder = tmp_path_factory.mktemp("chat_tokenizer")
    trained = train_bpe_tokenizer([OASST_TREES], 400, folder,
                                  special_tokens=("<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"))
    trained.config["chat_template"] = CHATML
    trained.save(folder)
    return Tokenizer.from_dir(folder)


@pytest.fixture(scope="module")
def conversation():
    """An Open Assistant example whose prompt is a conversation (user, assistant, user)."""
    return next(e for e in read_sft_source("oasst", str(OASST_TREES), template=PAPER) if len(e.turns) >= 3)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def generated(conversation):
    """Two answers to the multi-turn prompt and one to a one-turn prompt, as `orlhf generate` writes them."""
    turns = [list(turn) for turn in conversation.turns]
    return [{"prompt": conversation.prompt, "turns": turns, "response": "Sure, here it is.", "finished": True},
            {"prompt": conversation.prompt, "turns": turns, "response": "No.", "finished": True},
            {"prompt": "What is a cat?", "response": "A small animal.", "finished": True}]


def test_prompt_mix_keeps_the_turns_of_multi_turn_prompts(conversation):
    source = PromptSourceConfig(name="oasst", kind="sft", format="oasst", path=str(OASST_TREES))
    prompts, _ = read_prompt_mix([source], PAPER, None, 0)
    [prompt] = [p for p in prompts if p.text == conversation.prompt]
    assert prompt.turns == conversation.turns
    assert all(PAPER.fold_history(p.turns) == p.text for p in prompts if p.turns)
    assert any(not p.turns for p in prompts)


def test_label_scores_multi_turn_records_as_reward_training_encodes_them(tokenizer, conversation, tmp_path):
    path = write_jsonl(tmp_path / "samples.jsonl", generated(conversation))
    samples = read_samples("gen", "generated", "jsonl", str(path), PAPER, None, 0)
    assert [s.turns for s in samples] == [conversation.turns, conversation.turns, ()]
    pairs = [(s.prompt, s.response) for s in samples]
    chat = build_template(TemplateConfig(kind="chat"), tokenizer.config)
    scored = encode_scored(tokenizer, chat, pairs, 4096, None, [s.turns for s in samples])
    for sample, encoded in zip(samples, scored):
        assert encoded.input_ids == encode_sft(tokenizer, chat, sample.prompt, sample.response, 4096, "x",
                                               turns=sample.turns).input_ids
    assert scored[0].input_ids != encode_sft(tokenizer, chat, samples[0].prompt, samples[0].response, 4096,
                                             "x").input_ids  # not the history as one user message
    # The paper's format is the fold: the token ids are those of the prompt text alone.
    assert encode_scored(tokenizer, PAPER, pairs, 4096, None, [s.turns for s in samples]) == \
        encode_scored(tokenizer, PAPER, pairs, 4096)


def test_labeled_mixed_and_aligned_records_keep_and_encode_the_turns(tokenizer, conversation, tmp_path):
    samples = read_samples("gen", "generated", "jsonl", str(write_jsonl(tmp_path / "g.jsonl", generated(conversation))),
                           PAPER, None, 0)
    records = labeled_records(samples, [1.0, -1.0, 0.5], [1.0, -1.0, 0.5])
    assert records[0]["turns"] == [list(turn) for turn in conversation.turns] and "turns" not in records[2]
    labeled = write_jsonl(tmp_path / "labeled.jsonl", records)
    assert read_labeled_records(str(labeled)) == records  # what `orlhf mix` copies on
    chat = build_template(TemplateConfig(kind="chat"), tokenizer.config)
    for template in (chat, PAPER):
        dataset = build_alignment_dataset(labeled, tokenizer, template, 4096, 0.0, 0, reward_prompt=True)
        expected = {encode_sft(tokenizer, template, s.prompt, s.response, 4096, "x", eos=True, turns=s.turns,
                               response_prefix=template.reward_prompt(r["reward"])).input_ids
                    for s, r in zip(samples, records)}
        assert {row.sequence.input_ids for row in dataset.train} == expected
    folded = build_alignment_dataset(labeled, tokenizer, chat, 4096, 0.0, 0, reward_prompt=False)
    assert encode_sft(tokenizer, chat, samples[0].prompt, samples[0].response, 4096, "x").input_ids not in \
        {row.sequence.input_ids for row in folded.train}


def test_best_worst_pairs_carry_the_turns_into_the_pair_file(tokenizer, conversation, tmp_path):
    samples = read_samples("gen", "generated", "jsonl", str(write_jsonl(tmp_path / "g.jsonl", generated(conversation))),
                           PAPER, None, 0)
    records = labeled_records(samples, [2.0, -2.0, 0.0], [2.0, -2.0, 0.0])
    [built], counts = ranked_pairs(records, 0.5)
    assert built.example.turns == conversation.turns and counts["single_sample"] == 1
    written = json.loads(json.dumps(built.record()))
    assert written["turns"] == [list(turn) for turn in conversation.turns]
    example = read_pair_example(written, Location("pairs.jsonl", 1))
    assert example == built.example
    chat = build_template(TemplateConfig(kind="chat"), tokenizer.config)
    chosen, rejected = encode_pair_example(tokenizer, chat, example, 4096)
    assert chosen.input_ids == encode_sft(tokenizer, chat, example.prompt, example.chosen, 4096, "x",
                                          turns=conversation.turns).input_ids
    one_turn = pair_record(read_pair_example({"prompt": "Hi", "chosen": "a", "rejected": "b"}, Location("p", 1)))
    assert one_turn == {"prompt": "Hi", "chosen": "a", "rejected": "b"}  # no `turns` for a one-turn prompt


@pytest.mark.parametrize("turns, problem", [
    ("hello", "a list of [role, text] pairs, roles user/assistant alternating from user to a last user turn"),
    ([["user"]], "[role, text] pairs"),
    ([["user", 3]], "[role, text] pairs"),
    ([["user", "a"], ["user", "b"]], "expected turn 2 to be 'assistant', got 'user'"),
    ([["system", "a"]], "expected at least one user turn"),
    ([["system", "a"], ["assistant", "b"], ["user", "c"]], "expected turn 2 to be 'user', got 'assistant'"),
    ([["user", "a"], ["system", "b"], ["user", "c"]], "expected turn 2 to be 'assistant', got 'system'"),
    ([["user", "a"], ["assistant", "b"]], "expected the last turn to be a user turn"),
    ([], "expected at least one user turn"),
])
def test_a_malformed_turns_field_is_an_error_naming_file_and_line(turns, problem, tmp_path):
    record = {"prompt": "a", "turns": turns, "response": "r", "finished": True}
    good = {"prompt": "a", "response": "r", "finished": True}
    path = write_jsonl(tmp_path / "samples.jsonl", [good, record])
    with pytest.raises(DataError, match=f"^{re.escape(f'{path}:2: ')}expected 'turns' to be .*{re.escape(problem)}"):
        read_samples("gen", "generated", "jsonl", str(path), PAPER, None, 0)
    labeled = write_jsonl(tmp_path / "labeled.jsonl", [{**r, "kind": "generated", "source": "gen", "reward": 0.0}
                                                      for r in (good, record)])
    with pytest.raises(DataError, match=f"^{re.escape(f'{labeled}:2: ')}expected 'turns'"):
        read_labeled_records(str(labeled))


def test_a_blank_turn_and_empty_answers_are_skipped_and_counted(conversation, tmp_path):
    """As a blank prompt is, and as `orlhf align` skips a blank answer: cut off or finished,
    an empty (or blank) answer gives a reward nothing to rank."""
    good, _, one_turn = generated(conversation)
    blank_turn = {**good, "turns": [[role, " " if index == 1 else text]
                                    for index, (role, text) in enumerate(good["turns"])]}
    empty_cut = {**one_turn, "response": "", "finished": False}
    empty, blank = {**one_turn, "response": ""}, {**one_turn, "response": " \n"}
    path = write_jsonl(tmp_path / "samples.jsonl", [good, blank_turn, empty_cut, empty, blank])
    skips = Skips()
    samples = read_samples("gen", "generated", "jsonl", str(path), PAPER, None, 0, skips, include_unfinished=True)
    assert [(s.response, s.turns) for s in samples] == [(good["response"], conversation.turns)]
    assert skips.counts == {"blank 'turns' turn": 1, "blank 'response'": 3}
    with pytest.raises(UnusableRecord, match=f"^{re.escape(str(path))}:2: expected every turn of 'turns' to have text"):
        read_samples("gen", "generated", "jsonl", str(path), PAPER, None, 0, Skips(strict=True))
    strict = write_jsonl(tmp_path / "empty.jsonl", [good, empty])
    with pytest.raises(UnusableRecord, match=f"^{re.escape(str(strict))}:2: expected 'response' to be non-empty text"):
        read_samples("gen", "generated", "jsonl", str(strict), PAPER, None, 0, Skips(strict=True))


def test_answers_are_grouped_by_prompt_text_and_turns(conversation):
    """A one-turn prompt whose text is a conversation's fold, `User:` tags and all, is another
    prompt: its answer is never the rejected side of the conversation's pair."""
    turns = [list(turn) for turn in conversation.turns]
    record = {"prompt": conversation.prompt, "kind": "generated", "source": "gen"}
    records = [{**record, "turns": turns, "response": "Sure.", "reward": 1.0},
               {**record, "turns": turns, "response": "No.", "reward": -1.0},
               {**record, "response": "A one-turn answer.", "reward": -5.0}]
    [built], counts = ranked_pairs(records, 0.5)
    assert (built.example.chosen, built.example.rejected) == ("Sure.", "No.")
    assert counts == {"prompts": 2, "pairs": 1, "single_sample": 1, "tie": 0, "below_gap": 0}
    samples = [Sample(r["prompt"], r["response"], "gen", "generated", turns=tuple(map(tuple, r.get("turns", ()))))
               for r in records]
    assert list(selected_per_prompt(samples, [r["reward"] for r in records], {"gen": "worst"})) == [1, 2]


def test_the_paper_template_folds_a_prompts_turns_with_its_own_tags(tokenizer, conversation):
    """A multi-turn prompt's folded text was made with the tags of whatever read it: the
    paper template renders the turns with its own (identical ids when the tags match)."""
    qa = ChatTemplate(user_tag="Q:", assistant_tag="A:")
    ids = encode_prompt(tokenizer, qa, conversation.prompt, turns=conversation.turns)  # folded with User:/Assistant:
    assert tokenizer.decode(ids) == qa.prompt_text(qa.fold_history(conversation.turns))
    assert "Assistant:" not in tokenizer.decode(ids)
    assert encode_prompt(tokenizer, PAPER, conversation.prompt, turns=conversation.turns) == \
        encode_prompt(tokenizer, PAPER, conversation.prompt)
    sample = encode_sft(tokenizer, qa, conversation.prompt, "Fine.", 4096, "x", turns=conversation.turns)
    assert sample.input_ids[:len(ids)] == tuple(ids)
