"""encode_sft: exact loss boundary, response prefix, and every branch of the truncation rule."""

from __future__ import annotations

import pytest

from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import (
    IGNORE_INDEX,
    Reply,
    TokenizedSample,
    TokenStats,
    encode_prompt,
    encode_replies,
    encode_sft,
    fit_prompt,
    fit_turns,
    truncate_pair,
)
from offline_rlhf.data.tokenizer import train_bpe_tokenizer

TEMPLATE = ChatTemplate()
CORPUS = "\n".join([
    "User: How do I boil an egg? Assistant: Put it in boiling water for nine minutes.",
    "User: Translate 'bonjour' to English. Assistant: Hello.",
    "Naïve café owners say: the quick brown fox jumps over the lazy dog, 12345.",
] * 20)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    (root / "corpus.txt").write_text(CORPUS)
    return train_bpe_tokenizer([root / "corpus.txt"], 300, root / "tokenizer")


class CharTokenizer:
    """One token per character (its code point), EOS = 0: lengths are countable by eye."""

    eos_id = 0
    bos_id = 1
    adds_bos = False

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return [self.bos_id] * add_bos + [ord(char) for char in text]


# `U: abcdef A:` is 12 characters; ` xyz` + EOS is 5 tokens.
SHORT = ChatTemplate("U:", "A:", " ")


def char_sample(max_len: int) -> TokenizedSample:
    return encode_sft(CharTokenizer(), SHORT, "abcdef", "xyz", max_len, "test:1")


def text_of(ids) -> str:
    return "".join(chr(i) if i else "<eos>" for i in ids)


def test_prompt_tokens_are_ignored_and_response_tokens_labelled(tokenizer):
    prompt, response = "How do I boil an egg?\n\nQuickly.", "Put it in boiling water, naïve café."
    sample = encode_sft(tokenizer, TEMPLATE, prompt, response, 1024, "test:1")
    prompt_ids = tokenizer.encode(TEMPLATE.prompt_text(prompt))
    response_ids = tokenizer.encode(TEMPLATE.response_text(response)) + [tokenizer.eos_id]
    assert sample.labels == (IGNORE_INDEX,) * len(prompt_ids) + tuple(response_ids)
    assert sample.input_ids == tuple(prompt_ids + response_ids)
    assert sample.response_tokens == len(response_ids)
    assert tokenizer.decode(sample.input_ids) == TEMPLATE.prompt_text(prompt) + TEMPLATE.response_text(response)
    assert (sample.source, sample.truncated) == ("test:1", False)


def test_response_prefix_belongs_to_the_prompt(tokenizer):
    prefix = " <rm_score> 4.5"
    sample = encode_sft(tokenizer, TEMPLATE, "Say hello.", "Hello.", 1024, "test:1", response_prefix=prefix)
    prompt_ids = tokenizer.encode(TEMPLATE.prompt_text("Say hello.") + prefix)
    ignored = [i for i, label in zip(sample.input_ids, sample.labels) if label == IGNORE_INDEX]
    assert ignored == prompt_ids
    assert tokenizer.decode(ignored).endswith("Assistant: <rm_score> 4.5")
    assert tokenizer.decode(sample.input_ids) == "User: Say hello. Assistant: <rm_score> 4.5 Hello."


def test_a_reward_that_rounds_to_zero_has_one_spelling():
    from offline_rlhf.data.chat_template import ChatFormat

    assert TEMPLATE.reward_prompt(-0.04) == TEMPLATE.reward_prompt(0.04) == " <rm_score> 0.0"  # not "-0.0"
    assert TEMPLATE.reward_prompt(-0.06) == " <rm_score> -0.1" and TEMPLATE.reward_prompt(4.46) == " <rm_score> 4.5"
    assert ChatFormat.reward_prompt(None, -0.01) == "<rm_score> 0.0\n"


def test_a_tokenizer_without_eos_is_refused():
    class NoEos(CharTokenizer):
        eos_id = None

    with pytest.raises(ValueError, match="eos"):
        encode_sft(NoEos(), SHORT, "a", "b", 8, "test:1")


@pytest.mark.parametrize("prompt_len, response_len, max_len, kept_prompt, kept_response", [
    (3, 4, 7, [1, 2, 3], [11, 12, 13, 14]),  # fits: nothing cut
    (6, 3, 8, [2, 3, 4, 5, 6], [11, 12, 13]),  # prompt start cut, response whole
    (6, 6, 8, [3, 4, 5, 6], [11, 12, 13, 14]),  # prompt kept at max_len // 2, response end cut
    (2, 10, 8, [1, 2], [11, 12, 13, 14, 15, 16]),  # prompt shorter than max_len // 2: all kept
    (5, 5, 2, [5], [11]),  # the smallest max_len keeps one of each
])
def test_truncation_rule(prompt_len, response_len, max_len, kept_prompt, kept_response):
    prompt, response = list(range(1, prompt_len + 1)), list(range(11, 11 + response_len))
    assert truncate_pair(prompt, response, max_len) == (kept_prompt, kept_response)


def test_max_len_below_two_is_refused():
    with pytest.raises(ValueError, match="max_len"):
        truncate_pair([1], [2], 1)


def test_encode_sft_truncation_flags_and_stats():
    whole, prompt_cut, both_cut = char_sample(17), char_sample(14), char_sample(8)
    assert (text_of(whole.input_ids), whole.truncated) == ("U: abcdef A: xyz<eos>", False)
    # 14 - 5 response tokens = 9 prompt tokens, more than the floor of 7.
    assert (text_of(prompt_cut.input_ids), prompt_cut.truncated) == ("abcdef A: xyz<eos>", True)
    assert prompt_cut.labels == (IGNORE_INDEX,) * 9 + tuple(CharTokenizer().encode(" xyz")) + (0,)
    # The prompt keeps its floor of 8 // 2 = 4; the response loses its EOS.
    assert (text_of(both_cut.input_ids), both_cut.truncated) == ("f A: xyz", True)
    assert both_cut.response_tokens == 4

    stats = TokenStats()
    for sample in (whole, prompt_cut, both_cut):
        stats.add(sample)
    assert stats == TokenStats(samples=3, tokens=17 + 14 + 8, response_tokens=5 + 5 + 4, truncated=2)


def test_mismatched_labels_are_refused():
    with pytest.raises(ValueError, match="2 input ids but 1 labels"):
        TokenizedSample((1, 2), (IGNORE_INDEX,), "test:1", False)


# Three user turns: `U: u1 A: a1 U: u2 A: a2 U: u3 A:` under SHORT, one token per character.
TURNS = [("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"), ("user", "u3")]


def test_a_conversation_too_long_for_the_prompt_budget_loses_its_oldest_exchanges_first():
    chars = CharTokenizer()

    def fitted(budget, turns=TURNS):
        ids, cut = fit_prompt(chars, SHORT, "folded", budget, turns=turns)
        return text_of(ids), cut

    whole = text_of(encode_prompt(chars, SHORT, "folded", turns=TURNS))
    assert whole == "U: u1 A: a1 U: u2 A: a2 U: u3 A:" and fitted(len(whole)) == (whole, False)
    assert fitted(len(whole) - 1) == ("U: u2 A: a2 U: u3 A:", True)  # a whole exchange, not one character
    assert fitted(len("U: u3 A:")) == ("U: u3 A:", True)
    assert fitted(5) == ("u3 A:", True)  # the last user turn alone is too long: its last tokens
    assert fitted(8, turns=()) == ("folded A:"[-8:], True)  # a one-turn prompt: its last tokens, as before
    assert fit_turns([("user", "x")], len, lambda n: False) == (1, 0)  # the last user turn always stays


def test_an_over_long_conversation_in_training_drops_exchanges_while_that_spares_its_prompt():
    chars = CharTokenizer()

    def sample(max_len, turns=TURNS):
        return encode_sft(chars, SHORT, "folded", "xyz", max_len, "t", turns=turns)

    whole = sample(1000)
    assert text_of(whole.input_ids) == "U: u1 A: a1 U: u2 A: a2 U: u3 A: xyz<eos>" and not whole.truncated
    fitted = sample(len(whole) - 1)
    assert text_of(fitted.input_ids) == "U: u2 A: a2 U: u3 A: xyz<eos>" and fitted.truncated
    assert fitted.labels == sample(1000, TURNS[2:]).labels
    # The last user turn's prompt (8 tokens) is then cut to the room the response (5) leaves.
    assert text_of(sample(10).input_ids) == "u3 A: xyz<eos>" and sample(10).truncated


def test_the_replies_to_one_prompt_answer_the_same_history():
    """A preference pair's sides: a long reply needs an exchange dropped that a short one
    would keep; fitted together, both drop it (each side answers the same conversation)."""
    chars, short, long = CharTokenizer(), Reply("x", True, "chosen"), Reply("y" * 20, True, "rejected")
    alone = [encode_sft(chars, SHORT, "folded", r.text, 42, r.source, turns=TURNS) for r in (short, long)]
    assert [text_of(s.input_ids).split(" A: ")[0] for s in alone] == ["U: u1", "U: u2"]  # apart, they differ
    together = encode_replies(chars, SHORT, "folded", [short, long], 42, turns=TURNS)
    assert [text_of(s.input_ids) for s in together] == ["U: u2 A: a2 U: u3 A: x<eos>",
                                                        "U: u2 A: a2 U: u3 A: " + "y" * 20 + "<eos>"]
    assert [s.source for s in together] == ["chosen", "rejected"] and all(s.truncated for s in together)
    assert together[1] == alone[1]
