"""The real Qwen3 and Llama 3.2 Instruct tokenizers and chat templates (tests/real_tokenizers.py)
through production's encoding, against transformers' `apply_chat_template` on the same files:
the tokens of whole conversations, the answer labelled, the inference prompt, the tokens that
end an answer. Qwen3's template renders an answer with an empty reasoning block while it is
the last one and without it once a later question follows, so only the last answer's span
can be located by prefix rendering: what training labels (multi-turn histories used to fail).
Llama 3.2's prints a date: ours is fixed (`TEMPLATE_DATE`), so transformers is given it.
Mistral NeMo's moves the system message into the last user turn: refused at config time."""

import pytest
from transformers import AutoTokenizer

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import TemplateConfig
from offline_rlhf.data.chat_template import TEMPLATE_DATE, build_template
from offline_rlhf.data.errors import Location
from offline_rlhf.data.preference_readers import read_hh_rlhf
from offline_rlhf.data.sft_readers import messages_examples
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.tokenize import IGNORE_INDEX, encode_prompt, encode_sft, stop_token_ids
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.stages.convert import exported_template
from tests.local_data import HH_HARMLESS
from tests.real_tokenizers import NAMES, real_tokenizer_dir
from tests.unit.data.test_chat_template import CONVERSATIONS, MULTI

# What each real tokenizer ends an answer with and trains on after the generation prompt.
END_OF_TURN = {"qwen3": "<|im_end|>\n", "llama3_2": "<|eot_id|>"}
ANSWER_OPENS = {"qwen3": "<think>\n\n</think>\n\n", "llama3_2": ""}
DATE = TEMPLATE_DATE.strftime("%d %b %Y")  # what strftime_now gives our renderings


@pytest.fixture(scope="module", params=NAMES)
def real(request):
    folder = real_tokenizer_dir(request.param)
    return request.param, Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)


def _encode_last_answer(ours, messages):
    """Production's encoding of a conversation's last answer after its history (`turns`)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    fmt = build_template(TemplateConfig(kind="chat", system=system), ours.config)
    history = [(m["role"], m["content"]) for m in messages[1 if system else 0:-1]]
    sample = encode_sft(ours, fmt, "folded", messages[-1]["content"], 4096, "real", turns=history)
    return sample, encode_prompt(ours, fmt, "folded", "", history)


def _hf_text(hf, messages, **options):
    return hf.apply_chat_template(messages, tokenize=False, date_string=DATE, **options)


def _hf_ids(hf, messages, **options):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=True, date_string=DATE, **options)["input_ids"]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["single", "multi", "multi_no_system"])
def test_the_last_answer_is_encoded_and_labelled_as_the_real_template_renders_it(real, messages):
    name, ours, hf = real
    whole = _hf_text(hf, messages)
    prompt = _hf_text(hf, messages[:-1], add_generation_prompt=True)
    assert whole.startswith(prompt)
    sample, prompt_ids = _encode_last_answer(ours, messages)
    assert list(sample.input_ids) == _hf_ids(hf, messages)
    labelled = ours.decode([t for t in sample.labels if t != IGNORE_INDEX], skip_special_tokens=False)
    assert labelled == whole[len(prompt):] == ANSWER_OPENS[name] + messages[-1]["content"] + END_OF_TURN[name]
    assert prompt_ids == _hf_ids(hf, messages[:-1], add_generation_prompt=True)


def test_hh_rlhf_histories_encode_under_the_real_templates(real, shared_data):
    """The first 40 hh-rlhf pairs (29 of them multi-turn): each chosen reply after its
    history, as transformers renders the conversation."""
    name, ours, hf = real
    fmt = build_template(TemplateConfig(kind="chat"), ours.config)
    pairs = read_hh_rlhf(HH_HARMLESS, template=fmt, skips=Skips())[:40]
    assert sum(len(pair.turns) > 1 for pair in pairs) == 29
    for pair in pairs:
        history = pair.turns or (("user", pair.prompt),)
        messages = [{"role": role, "content": text} for role, text in history]
        messages.append({"role": "assistant", "content": pair.chosen})
        sample = encode_sft(ours, fmt, pair.prompt, pair.chosen, 8192, pair.source, turns=pair.turns)
        assert list(sample.input_ids) == _hf_ids(hf, messages), pair.source
        labelled = ours.decode([t for t in sample.labels if t != IGNORE_INDEX], skip_special_tokens=False)
        assert labelled.endswith(pair.chosen.strip() + END_OF_TURN[name]), pair.source


def test_a_records_own_system_message_encodes_as_the_real_template_renders_it(real):
    """A `messages` row opening with a system message: its system turn, not text folded into
    the user turn, in the training sample and the inference prompt."""
    _, ours, hf = real
    fmt = build_template(TemplateConfig(kind="chat"), ours.config)
    [example] = messages_examples([(Location("chats.jsonl", 1), {"messages": MULTI[:3]})], "messages", fmt, Skips(),
                                  "t")
    sample = encode_sft(ours, fmt, example.prompt, example.response, 4096, "t", turns=example.turns)
    assert list(sample.input_ids) == _hf_ids(hf, MULTI[:3])
    assert encode_prompt(ours, fmt, example.prompt, turns=example.turns) == \
        _hf_ids(hf, MULTI[:2], add_generation_prompt=True)


def test_the_real_tokenizers_roles_and_the_tokens_that_end_an_answer(real):
    name, ours, hf = real
    fmt = build_template(TemplateConfig(kind="chat"), ours.config)
    assert ours.eos_id == hf.eos_token_id and ours.bos_id == hf.bos_token_id
    assert ours.vocab_size == len(hf)
    assert ours.adds_bos == (name == "llama3_2")  # Llama 3's post-processor adds <|begin_of_text|>
    assert fmt.end_of_turn() == END_OF_TURN[name]
    assert stop_token_ids(ours, fmt) == {hf.convert_tokens_to_ids(END_OF_TURN[name].strip())}
    assert ours.pad_with_eos() == (name == "llama3_2")  # Llama 3 names no pad token; Qwen3's is <|endoftext|>
    assert ours.pad_id == hf.convert_tokens_to_ids("<|endoftext|>" if name == "qwen3" else "<|eot_id|>")


def test_a_multi_turn_conversation_failed_under_qwen3_before_only_the_last_answer_was_located(real):
    """Every answer's span needs each rendering to extend the one before; Qwen3's rewrites an
    earlier answer, which `every_turn` (what the tests compare with transformers' assistant
    masks) still refuses, naming the turn."""
    name, ours, _ = real
    chat = build_template(TemplateConfig(kind="chat"), ours.config).chat
    if name == "qwen3":
        with pytest.raises(ValueError, match="message 5's generation prompt so that earlier text changes"):
            chat.conversation(MULTI)
    else:
        assert len(chat.conversation(MULTI).spans) == 2
    assert len(chat.conversation(MULTI, every_turn=False).spans) == 1


def test_mistral_nemo_refuses_a_system_message_at_config_time_and_encodes_conversations_without_one():
    """Its template writes the system message into the last user turn: a prompt holds it and
    the conversation answering that prompt (the training text) does not. Was: the first
    multi-turn record stopped the stage; now the setting is named before data is read."""
    folder = real_tokenizer_dir("mistral_nemo")
    ours, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    with pytest.raises(ConfigError, match="template.system: is set, but .* does not keep it where a conversation"):
        build_template(TemplateConfig(kind="chat", system="Answer briefly."), ours.config)
    sample, prompt_ids = _encode_last_answer(ours, MULTI[1:])
    assert list(sample.input_ids) == _hf_ids(hf, MULTI[1:])
    assert prompt_ids == _hf_ids(hf, MULTI[1:-1], add_generation_prompt=True)
    assert ours.decode([t for t in sample.labels if t != IGNORE_INDEX], skip_special_tokens=False) == \
        MULTI[-1]["content"] + "</s>"
    # A record's own system message opens its first user turn there, as the paper's format puts it.
    fmt = build_template(TemplateConfig(kind="chat"), ours.config)
    [example] = messages_examples([(Location("chats.jsonl", 1), {"messages": MULTI[:3]})], "messages", fmt, Skips(),
                                  "t")
    folded = [{"role": "user", "content": "Answer briefly.\n\nName a colour."}, MULTI[2]]
    sample = encode_sft(ours, fmt, example.prompt, example.response, 4096, "t", turns=example.turns)
    assert list(sample.input_ids) == _hf_ids(hf, folded)
    # Its export folds a caller's system message as well (the template alone would move it).
    exported = exported_template({"kind": "chat", "system": ""}, ours, None)
    turns = [(m["role"], m["content"]) for m in MULTI[:-1]]
    assert _hf_ids(hf, MULTI[:-1], chat_template=exported, add_generation_prompt=True) == \
        encode_prompt(ours, fmt, "folded", turns=turns) != _hf_ids(hf, MULTI[:-1], add_generation_prompt=True)
