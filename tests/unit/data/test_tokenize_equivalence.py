"""encode_replies / encode_sft / fit_prompt give exactly the ids, labels and flags of a
straightforward reference (each reply's prompt encoded on its own after every dropped
exchange, `adds_bos` asked of the backend each time: the code before the prompt was
shared and `adds_bos` cached) on real multi-turn data: hh-rlhf and Open Assistant, under
the paper's template and two real chat-template families, with and without BOS."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.processors import TemplateProcessing

from offline_rlhf.config.schema import TemplateConfig
from offline_rlhf.data.chat_template import ChatFormat, build_template
from offline_rlhf.data.preference_readers import read_hh_rlhf, read_oasst_pairs
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import ASSISTANT, ChatTemplate
from offline_rlhf.data.tokenize import (
    IGNORE_INDEX,
    SEQUENTIAL_DROPS,
    Reply,
    TokenizedSample,
    _label_chat,
    _Labelled,
    encode_replies,
    encode_sft,
    fit_prompt,
    fit_turns,
)
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from tests.unit.data.test_chat_template import CHATML, LLAMA3, SPECIALS

HH = ("hh-rlhf", "harmless-base", "test-dev.jsonl")
OASST = ("open-assistant", "model_eval_manual_data", "en_100_tree.jsonl")


def reference_adds_bos(tokenizer) -> bool:
    if "add_bos_token" in tokenizer.config:
        return bool(tokenizer.config["add_bos_token"]) and tokenizer.bos_id is not None
    return tokenizer.bos_id is not None and \
        tokenizer.backend.encode("a", add_special_tokens=True).ids[:1] == [tokenizer.bos_id]


def reference_prompt(tokenizer, template, prompt, response_prefix, turns) -> list[int]:
    if isinstance(template, ChatFormat):
        return tokenizer.encode(template.chat.prompt(template.messages(prompt, turns), response_prefix))
    instruction = template.fold_history(turns) if turns else prompt
    return tokenizer.encode(template.prompt_text(instruction) + response_prefix, add_bos=reference_adds_bos(tokenizer))


def reference_replies(tokenizer, template, prompt, replies, max_len, response_prefix="", turns=()):
    """Every reply labelled whole (prompt + response) after each set of kept turns."""

    def labeller(reply):
        if isinstance(template, ChatFormat):
            answer = {"role": ASSISTANT, "content": reply.text}
            return lambda kept: _label_chat(tokenizer, template.chat, [*template.messages(prompt, kept), answer],
                                            response_prefix, every_turn=False, end_of_turn=reply.eos)
        response = tokenizer.encode(template.response_text(reply.text)) + ([tokenizer.eos_id] if reply.eos else [])

        def labelled(kept):
            ids = reference_prompt(tokenizer, template, prompt, response_prefix, kept)
            return _Labelled(ids + response, [IGNORE_INDEX] * len(ids) + response, len(ids))

        return labelled

    labellers = [labeller(reply) for reply in replies]
    dropped = 0
    samples = [label(turns) for label in labellers]
    while dropped + 2 < len(turns) and not all(sample.prompt_whole(max_len) for sample in samples):
        dropped += 2
        samples = [label(turns[dropped:]) for label in labellers]
    return [sample.cut(max_len, reply.source, dropped > 0) for sample, reply in zip(samples, replies)]


def reference_fit_prompt(tokenizer, template, prompt, budget, turns):
    ids, dropped = fit_turns(turns, lambda kept: reference_prompt(tokenizer, template, prompt, "", kept),
                             lambda ids: len(ids) <= budget)
    return ids[-budget:], dropped > 0 or len(ids) > budget


@pytest.fixture(scope="module")
def real_pairs(shared_data):
    """Paper-template pairs (their turns are what every template renders): 200 hh-rlhf
    conversations and every third Open Assistant ranked pair of the 100 trees (up to 5 turns)."""
    hh = read_hh_rlhf(shared_data.joinpath(*HH), skips=Skips())[:200]
    oasst = read_oasst_pairs(shared_data.joinpath(*OASST), skips=Skips())[::3]
    assert sum(len(pair.turns) >= 5 for pair in hh) > 50 and sum(len(pair.turns) >= 3 for pair in oasst) > 50
    return hh + oasst


@pytest.fixture(scope="module", params=["paper", "paper_bos", "paper_post_processor", "llama3", "chatml"])
def setup(request, real_pairs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    corpus = "\n".join(f"{p.prompt} {p.chosen} {p.rejected}" for p in real_pairs[:300])
    (folder / "corpus.txt").write_text(corpus)
    tokenizer = train_bpe_tokenizer([folder / "corpus.txt"], 2000, folder / "tok", special_tokens=SPECIALS)
    if request.param in ("llama3", "chatml"):
        tokenizer.config["chat_template"] = LLAMA3 if request.param == "llama3" else CHATML
        # Rendering by Jinja is slow and this path did not change: a third of the pairs.
        return tokenizer, build_template(TemplateConfig(kind="chat"), tokenizer.config), real_pairs[::3]
    if request.param == "paper_bos":
        tokenizer.config.update(bos_token="<|begin_of_text|>", add_bos_token=True)
    if request.param == "paper_post_processor":  # Llama 3's way: tokenizer.json's post-processor adds BOS
        tokenizer = Tokenizer(BackendTokenizer.from_str(tokenizer.backend.to_str()),
                              {**tokenizer.config, "bos_token": "<|begin_of_text|>"})
        tokenizer.backend.post_processor = TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tokenizer.bos_id)])
        assert tokenizer.adds_bos
    return tokenizer, ChatTemplate(), real_pairs


def same(got: list[TokenizedSample], expected: list[TokenizedSample]) -> bool:
    return [(s.input_ids, s.labels, s.source, s.truncated) for s in got] == \
        [(s.input_ids, s.labels, s.source, s.truncated) for s in expected]


@pytest.mark.parametrize("max_len", [48, 512])
def test_pairs_encode_exactly_as_the_reference(setup, max_len):
    tokenizer, template, real_pairs = setup
    dropped = 0
    for index, pair in enumerate(real_pairs):
        ended = index % 5 != 0  # some replies cut at max_new_tokens: no EOS / end-of-turn marker
        replies = [Reply(pair.chosen, True, "chosen"), Reply(pair.rejected, ended, "rejected")]
        prefix = " <rm_score> 4.5" if index % 3 == 0 else ""  # Decision Transformer's reward prompt
        got = encode_replies(tokenizer, template, pair.prompt, replies, max_len, prefix, pair.turns)
        expected = reference_replies(tokenizer, template, pair.prompt, replies, max_len, prefix, pair.turns)
        assert same(got, expected), (pair.source, max_len)
        one = encode_sft(tokenizer, template, pair.prompt, pair.chosen, max_len, "one", turns=pair.turns)
        assert same([one], reference_replies(tokenizer, template, pair.prompt, [Reply(pair.chosen, True, "one")],
                                             max_len, turns=pair.turns))
        dropped += got[0].truncated
    assert dropped > (20 if max_len < 512 else 0)  # the drop-exchanges path ran


@pytest.mark.parametrize("budget", [24, 400])
def test_prompts_fit_exactly_as_the_reference(setup, budget):
    tokenizer, template, real_pairs = setup
    for pair in real_pairs:
        assert fit_prompt(tokenizer, template, pair.prompt, budget, turns=pair.turns) == \
            reference_fit_prompt(tokenizer, template, pair.prompt, budget, pair.turns), pair.source


def test_adds_bos_follows_a_replaced_post_processor(setup):
    tokenizer, _, _ = setup
    if "add_bos_token" in tokenizer.config:
        return
    copy = Tokenizer(BackendTokenizer.from_str(tokenizer.backend.to_str()),
                     {**tokenizer.config, "bos_token": "<|begin_of_text|>"})
    copy.backend.post_processor = None
    assert not copy.adds_bos
    copy.backend.post_processor = TemplateProcessing(single="<|begin_of_text|> $A",
                                                     special_tokens=[("<|begin_of_text|>", copy.bos_id)])
    assert copy.adds_bos and reference_adds_bos(copy)
    copy.backend.post_processor = None
    assert not copy.adds_bos


def reference_fit_turns(turns, encode, fits):
    """Dropping one exchange at a time, however many must go."""
    dropped, encoded = 0, encode(turns)
    while dropped + 2 < len(turns) and not fits(encoded):
        dropped += 2
        encoded = encode(turns[dropped:])
    return encoded, dropped


@pytest.fixture(scope="module")
def long_conversations(real_pairs):
    """Conversations of over 40 turns made of consecutive real hh-rlhf conversations (each
    answered by its chosen reply), the kind `fit_turns` bisects."""
    hh = [pair for pair in real_pairs if pair.source.startswith("hh_rlhf") and pair.turns
          and pair.turns[0][0] == pair.turns[-1][0] == "user"]
    conversations = []
    for start, count in ((0, 16), (16, 20)):
        turns = []
        for pair in hh[start:start + count]:
            turns += [*pair.turns, (ASSISTANT, pair.chosen)]
        conversations.append((tuple(turns[:-1]), hh[start + count - 1]))
    assert [len(turns) > 40 for turns, _ in conversations] == [True] * 2
    return conversations


def test_long_conversations_are_bisected_to_the_reference_s_answer(setup, long_conversations):
    tokenizer, template, _ = setup
    # Rendering by Jinja is slow: one conversation for the chat templates.
    for turns, last in long_conversations[:1] if isinstance(template, ChatFormat) else long_conversations:
        # Budgets where the answer changes, and just below: 0, 2, 6, 12, 20... turns dropped.
        drops = sorted({min(2 * k * (k + 1) // 2, len(turns) - 1) for k in range(10)})
        lengths = [len(reference_prompt(tokenizer, template, "", "", turns[drop:])) for drop in drops]
        for budget in sorted({length + delta for length in lengths for delta in (-1, 0)} - {0}):
            got = fit_prompt(tokenizer, template, "", budget, turns=turns)
            assert got == reference_fit_prompt(tokenizer, template, "", budget, turns), budget
        for max_len in (64, 1024):
            replies = [Reply(last.chosen, True, "c"), Reply(last.rejected, False, "r")]
            got = encode_replies(tokenizer, template, "", replies, max_len, "", turns)
            assert same(got, reference_replies(tokenizer, template, "", replies, max_len, "", turns)), max_len


@pytest.mark.parametrize("turns", [1, 3, 9, 11, 13, 21, 101, 301])
def test_bisection_finds_the_first_fit_in_few_encodings(turns):
    conversation = tuple(("user" if index % 2 == 0 else "assistant", "x" * (1 + index % 7)) for index in range(turns))

    calls = []

    def size(kept):
        calls.append(len(kept))
        return sum(len(text) + 3 for _, text in kept)

    total = size(conversation)
    for budget in sorted({total - size(conversation[drop:]) for drop in range(0, turns, 2)} | {0, 1, total}):
        calls.clear()
        got = fit_turns(conversation, size, lambda length: length <= budget)
        assert len(calls) <= min(turns // 2 + 1, 1 + SEQUENTIAL_DROPS + turns.bit_length())
        assert got == reference_fit_turns(conversation, size, lambda length: length <= budget)
