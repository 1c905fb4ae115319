"""Chat-template rendering and the assistant-token loss mask against transformers'
`apply_chat_template`, on a Llama-3-style and a ChatML (Qwen2-style) template."""

import json

import jinja2
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import TemplateConfig
from offline_rlhf.data.chat_template import ChatFormat, JinjaChat, build_template, paper_jinja, template_record
from offline_rlhf.data.errors import DataError, Location
from offline_rlhf.data.preference_readers import chat_pairs, read_hh_rlhf
from offline_rlhf.data.sft_readers import messages_examples
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import (
    IGNORE_INDEX,
    _label_chat,
    encode_prompt,
    encode_sft,
    fit_prompt,
    stop_token_ids,
)
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from offline_rlhf.serving.protocol import chat_turns

# The structure of the two template families real checkpoints ship (written for this test).
# `{% generation %}` marks what transformers' assistant mask covers, the same text our
# spans cover: the assistant content and its end-of-turn marker.
LLAMA3 = ("{{- bos_token }}{%- for m in messages %}"
          "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
          "{%- if m['role'] == 'assistant' %}"
          "{% generation %}{{- m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
          "{%- else %}{{- m['content'] | trim + '<|eot_id|>' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
CHATML = ("{%- for m in messages %}{%- if loop.first and m['role'] != 'system' %}"
          "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
          "{{- '<|im_start|>' + m['role'] + '\\n' }}"
          "{%- if m['role'] == 'assistant' %}{% generation %}{{- m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
          "{%- else %}{{- m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
SPECIALS = ("<|pad|>", "<|begin_of_text|>", "<|eos|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>")
SINGLE = [{"role": "user", "content": "What is a cat?"}, {"role": "assistant", "content": "A small animal."}]
MULTI = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And another one?"},
         {"role": "assistant", "content": "Green, the colour of grass."}]
CONVERSATIONS = [SINGLE, MULTI, MULTI[1:]]


def encode_chat(tokenizer, chat, messages, max_len, source, response_prefix="", every_turn=True):
    """A whole conversation as production labels it (`_label_chat`, which `encode_sft` uses
    with `every_turn=False`), every assistant turn labelled by default, cut to `max_len`."""
    return _label_chat(tokenizer, chat, messages, response_prefix, every_turn, end_of_turn=True).cut(max_len, source)


def encode_chat_prompt(tokenizer, chat, messages, response_prefix=""):
    """The inference prompt of a conversation ending in a user turn, through production's
    `encode_prompt` (a leading system message as the format's `system`, the rest as turns)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = [(m["role"], m["content"]) for m in messages[1 if system else 0:]]
    return encode_prompt(tokenizer, ChatFormat(chat, system=system), "", response_prefix, turns)


@pytest.fixture(scope="module", params=[LLAMA3, CHATML], ids=["llama3", "chatml"])
def tokenizers(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    text = " ".join(m["content"] for c in CONVERSATIONS for m in c) + " system user assistant helpful\n"
    (folder / "corpus.txt").write_text(text * 20)
    ours = train_bpe_tokenizer([folder / "corpus.txt"], 400, folder / "tok", special_tokens=SPECIALS)
    ours.config["chat_template"] = request.param
    ours.save(folder / "tok")
    return Tokenizer.from_dir(folder / "tok"), PreTrainedTokenizerFast.from_pretrained(folder / "tok")


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["single", "multi", "multi_no_system"])
def test_rendering_and_tokens_equal_apply_chat_template(tokenizers, messages):
    ours, hf = tokenizers
    chat = JinjaChat.of(ours.config)
    assert chat.render(messages) == hf.apply_chat_template(messages, tokenize=False)
    prompt = messages[:-1]
    assert chat.prompt(prompt) == hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    sample = encode_chat(ours, chat, messages, 4096, "test")
    assert list(sample.input_ids) == expected["input_ids"]
    assert [label != IGNORE_INDEX for label in sample.labels] == [bool(m) for m in expected["assistant_masks"]]
    assert [label for label in sample.labels if label != IGNORE_INDEX] == \
        [token for token, m in zip(expected["input_ids"], expected["assistant_masks"]) if m]
    assert encode_chat_prompt(ours, chat, prompt) == \
        hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_one_loss_span_per_assistant_turn(tokenizers):
    ours, _ = tokenizers
    sample = encode_chat(ours, JinjaChat.of(ours.config), MULTI, 4096, "test")
    trained = [label != IGNORE_INDEX for label in sample.labels]
    starts = [i for i, flag in enumerate(trained) if flag and (i == 0 or not trained[i - 1])]
    assert len(starts) == 2
    assert ours.decode([t for t, keep in zip(sample.input_ids, trained) if keep], skip_special_tokens=False) == \
        "Blue.{end}Green, the colour of grass.{end}".format(
            end="<|eot_id|>" if "eot_id" in ours.config["chat_template"] else "<|im_end|>\n")


def test_reward_prompt_follows_the_generation_prompt_unlabelled_and_matches_inference(tokenizers):
    ours, _ = tokenizers
    chat = JinjaChat.of(ours.config)
    reward = "<rm_score> 1.5\n"
    sample = encode_chat(ours, chat, SINGLE, 4096, "dt", response_prefix=reward)
    prompt_ids = encode_chat_prompt(ours, chat, SINGLE[:1], reward)
    assert list(sample.input_ids[:len(prompt_ids)]) == prompt_ids
    assert all(label == IGNORE_INDEX for label in sample.labels[:len(prompt_ids)])
    assert all(label != IGNORE_INDEX for label in sample.labels[len(prompt_ids):])
    plain = encode_chat(ours, chat, SINGLE, 4096, "sft")
    assert sample.response_tokens == plain.response_tokens


def test_over_long_conversations_keep_the_last_answer(tokenizers):
    ours, _ = tokenizers
    chat = JinjaChat.of(ours.config)
    whole = encode_chat(ours, chat, MULTI, 4096, "x")
    cut = encode_chat(ours, chat, MULTI, 24, "x")
    assert cut.truncated and len(cut) == 24
    assert cut.labels[-4:] == whole.labels[-4:]
    assert cut.input_ids == whole.input_ids[-24:]  # the oldest history goes first


def test_an_empty_answer_is_labelled_on_its_end_of_turn_marker(tokenizers):
    """A labeller's preferred empty reply, an empty generation: as the paper's format labels
    EOS alone, a chat template labels its end-of-turn marker alone (history turns still need text)."""
    ours, hf = tokenizers
    fmt = build_template(TemplateConfig(kind="chat"), ours.config)
    for history in ([], [(m["role"], m["content"]) for m in MULTI[1:4]]):
        empty = encode_sft(ours, fmt, "What is a cat?", "", 4096, "e", turns=history)
        messages = [*fmt.messages("What is a cat?", history), {"role": "assistant", "content": ""}]
        assert list(empty.input_ids) == hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ours.decode([t for t in empty.labels if t != IGNORE_INDEX], skip_special_tokens=False) == \
            fmt.end_of_turn()
        prompt = encode_prompt(ours, fmt, "What is a cat?", turns=history)
        assert list(empty.input_ids[:len(prompt)]) == prompt and empty.response_tokens == len(empty) - len(prompt)
        cut = encode_sft(ours, fmt, "What is a cat?", "", 4096, "e", eos=False, turns=history)  # rm-score's case
        assert list(cut.input_ids) == prompt and set(cut.labels) == {IGNORE_INDEX}
    paper = encode_sft(ours, ChatTemplate(), "What is a cat?", "", 4096, "e")
    assert paper.labels[-1] == ours.eos_id
    with pytest.raises(ValueError, match="expected text in the assistant turn at position 2"):
        JinjaChat.of(ours.config).conversation([*MULTI[1:2], {"role": "assistant", "content": " "}, *MULTI[3:]])


def test_hh_rlhf_histories_with_an_empty_reply_encode_under_a_chat_template(tokenizers, shared_data):
    # The reader skips a pair with a blank side; an empty reply still encodes (SFT's end-of-turn label).
    ours, _ = tokenizers
    fmt = build_template(TemplateConfig(kind="chat"), ours.config)
    pairs = read_hh_rlhf(shared_data / "hh-rlhf" / "harmless-base" / "test-dev.jsonl", template=fmt, skips=Skips())
    for pair in pairs[:4]:
        sample = encode_sft(ours, fmt, pair.prompt, "", 4096, pair.source, turns=pair.turns)
        assert ours.decode([t for t in sample.labels if t != IGNORE_INDEX], skip_special_tokens=False) == \
            fmt.end_of_turn()


def test_roles_and_templates_are_checked(tokenizers):
    ours, _ = tokenizers
    chat = JinjaChat.of(ours.config)
    with pytest.raises(ValueError, match="end with a 'assistant' turn"):
        chat.conversation(SINGLE[:1])
    with pytest.raises(ValueError, match="expected a 'user' turn at position 1"):
        chat.prompt([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="expected text"):
        chat.prompt([{"role": "user", "content": "  "}])
    with pytest.raises(ConfigError, match="chat needs a chat_template"):
        JinjaChat.of({"eos_token": "<|eos|>"})
    rewriting = JinjaChat("{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="earlier text changes"):
        rewriting.conversation(MULTI)


def test_templates_run_sandboxed():
    escape = JinjaChat("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="the chat template failed"):
        escape.render(SINGLE)
    failing = JinjaChat("{{ raise_exception('no system role') }}")
    with pytest.raises(ValueError, match="no system role"):
        failing.render(SINGLE)


def test_template_kind_chat_goes_through_encode_sft_and_encode_prompt(tokenizers):
    """`template.kind=chat` reaches every stage through encode_sft/encode_prompt: one user
    turn from a prompt string, a history from `turns` (only its last answer labelled), a
    system message, and an unfinished answer without its end-of-turn marker."""
    ours, _ = tokenizers
    fmt = build_template(TemplateConfig(kind="chat"), ours.config)
    chat = JinjaChat.of(ours.config)
    single = encode_sft(ours, fmt, "What is a cat?", "A small animal.", 4096, "s")
    assert single == encode_chat(ours, chat, SINGLE, 4096, "s")
    assert encode_prompt(ours, fmt, "What is a cat?") == encode_chat_prompt(ours, chat, SINGLE[:1])
    history = [(m["role"], m["content"]) for m in MULTI[1:-1]]
    last_only = encode_sft(ours, fmt, "folded", MULTI[-1]["content"], 4096, "m", turns=history)
    every = encode_chat(ours, chat, MULTI[1:], 4096, "m")
    assert last_only.input_ids == every.input_ids
    assert last_only.response_tokens < every.response_tokens
    assert ours.decode([t for t in last_only.labels if t != IGNORE_INDEX], skip_special_tokens=True) == \
        "Green, the colour of grass." + ("" if "eot_id" in ours.config["chat_template"] else "\n")
    system = build_template(TemplateConfig(kind="chat", system="Answer briefly."), ours.config)
    assert encode_sft(ours, system, "Name a colour.", "Blue.", 4096, "x") == \
        encode_chat(ours, chat, MULTI[:3], 4096, "x")
    cut = encode_sft(ours, fmt, "What is a cat?", "A small animal.", 4096, "s", eos=False)
    assert cut.input_ids == single.input_ids[:len(cut)] and len(single) - len(cut) >= 1
    assert ours.decode(cut.input_ids[-2:], skip_special_tokens=False).endswith("animal.")


def test_a_conversation_cut_to_fit_keeps_the_system_message_and_whole_turns(tokenizers):
    """Under a chat template with a system message, an over-long conversation loses its
    oldest exchange, not its first tokens (the BOS, the system message, a turn's header)."""
    ours, _ = tokenizers
    fmt = build_template(TemplateConfig(kind="chat", system="Answer briefly."), ours.config)
    turns = [(m["role"], m["content"]) for m in MULTI[1:-1]]
    whole = encode_prompt(ours, fmt, "folded", turns=turns)
    recent = encode_prompt(ours, fmt, "folded", turns=turns[2:])
    assert fit_prompt(ours, fmt, "folded", len(whole), turns=turns) == (whole, False)
    assert fit_prompt(ours, fmt, "folded", len(whole) - 1, turns=turns) == (recent, True)
    text = ours.decode(recent, skip_special_tokens=False)
    assert "Answer briefly." in text and "And another one?" in text and "Blue." not in text
    answer = MULTI[-1]["content"]
    sample = encode_sft(ours, fmt, "folded", answer, len(whole) - 1 + len(ours.encode(answer)), "m", turns=turns)
    assert sample.input_ids == encode_sft(ours, fmt, "folded", answer, 4096, "m", turns=turns[2:]).input_ids
    assert sample.truncated


def test_records_of_a_template_rebuild_it():
    chat_source = {"chat_template": CHATML, "eos_token": "<|eos|>"}
    for template in (ChatTemplate("Q:", "A:", "\n"), build_template(TemplateConfig(kind="chat", system="S"),
                                                                     chat_source)):
        assert build_template(template_record(template), chat_source) == template
    assert build_template({"user_tag": "U:", "assistant_tag": "A:", "sep": " "}, {}) == ChatTemplate("U:", "A:", " ")
    with pytest.raises(ConfigError, match="template.system: needs template.kind=chat"):
        TemplateConfig(system="be nice")
    with pytest.raises(ConfigError, match="template.kind: 'jinja' is not a template kind"):
        TemplateConfig(kind="jinja")


def test_bos_leads_exactly_when_the_tokenizer_asks_for_it(tokenizers):
    ours, _ = tokenizers
    template = ChatTemplate()
    assert not ours.adds_bos and encode_prompt(ours, template, "hi")[0] != ours.bos_id
    asking = Tokenizer(ours.backend, {**ours.config, "bos_token": "<|begin_of_text|>", "add_bos_token": True})
    assert asking.adds_bos and encode_prompt(asking, template, "hi") == [asking.bos_id, *encode_prompt(ours, template,
                                                                                                       "hi")]
    sample = encode_sft(asking, template, "hi", "there", 64, "b")
    assert sample.input_ids[0] == asking.bos_id and sample.labels[0] == IGNORE_INDEX
    processed = Tokenizer(BackendTokenizer.from_str(ours.backend.to_str()), dict(asking.config))
    del processed.config["add_bos_token"]
    assert not processed.adds_bos
    processed.backend.post_processor = TemplateProcessing(single="<|begin_of_text|> $A",
                                                          special_tokens=[("<|begin_of_text|>", processed.bos_id)])
    assert processed.adds_bos  # Llama 3 style: tokenizer.json's post-processor adds BOS


@pytest.mark.parametrize("bos", [False, True])
def test_the_paper_format_as_a_chat_template_prompts_as_training_does(tokenizers, tmp_path, bos):
    """What `orlhf convert export_hf` writes for a paper-format model: transformers'
    apply_chat_template gives encode_prompt's tokens, and the conversation's text."""
    ours, _ = tokenizers
    template = ChatTemplate("Question:", "Answer:", " ")
    config = {**ours.config, "chat_template": paper_jinja(template, bos), "bos_token": "<|begin_of_text|>"}
    if bos:
        config["add_bos_token"] = True
    Tokenizer(ours.backend, config).save(tmp_path / "tok")
    mine, hf = Tokenizer.from_dir(tmp_path / "tok"), PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    assert mine.adds_bos == bos
    history = [(m["role"], m["content"]) for m in MULTI[:4]]  # system, user, assistant, user
    for turns in (history[1:2], history[1:], history[:2], history):
        messages = [{"role": role, "content": text} for role, text in turns]
        expected = encode_prompt(mine, template, template.fold_history(turns))
        got = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert got == expected
    whole = hf.apply_chat_template(SINGLE, tokenize=False)
    assert whole == ("<|begin_of_text|>" if bos else "") + "Question: What is a cat? Answer: A small animal.<|eos|>"
    assert hf.apply_chat_template(MULTI[:3], tokenize=False).endswith(
        "Question: Answer briefly.\n\nName a colour. Answer: Blue.<|eos|>")
    with pytest.raises(jinja2.TemplateError, match="user and assistant turns only"):
        hf.apply_chat_template([*MULTI[:2], {"role": "system", "content": "Later."}], tokenize=False)
    # System (or developer) messages as `orlhf serve` reads a request's: joined, blank ones left out.
    for system in ([("system", "a"), ("system", "b")], [("developer", "a")], [("system", " ")]):
        messages = [{"role": role, "content": text} for role, text in system] + [{"role": "user", "content": "u"}]
        turns = chat_turns(messages)
        expected = encode_prompt(mine, template, template.fold_history(turns), turns=turns)
        assert hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == expected


def test_answers_stop_at_eos_and_at_the_templates_end_of_turn_token(tokenizers):
    ours, _ = tokenizers
    chat = ChatFormat(JinjaChat.of(ours.config))
    marker = "<|eot_id|>" if "eot_id" in ours.config["chat_template"] else "<|im_end|>"
    assert chat.end_of_turn().strip() == marker
    assert stop_token_ids(ours, chat) == {ours.eos_id, ours.backend.token_to_id(marker)} and len({
        ours.eos_id, ours.backend.token_to_id(marker)}) == 2  # the fixture's EOS is another token
    assert stop_token_ids(ours, ChatTemplate()) == {ours.eos_id}  # the paper's format ends with EOS
    plain = ChatFormat(JinjaChat("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                 "{% if add_generation_prompt %}assistant: {% endif %}"))
    assert stop_token_ids(ours, plain) == {ours.eos_id}  # what follows an answer is no special token


def test_a_chat_template_saved_on_its_own_is_read_and_imported(tokenizers, tmp_path):
    """transformers >= 4.50 saves a chat template to chat_template.jinja, not into
    tokenizer_config.json: it is read from there, and an import copies it."""
    from offline_rlhf.models.hf import copy_tokenizer_files

    ours, hf = tokenizers
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert "chat_template.jinja" in copy_tokenizer_files(tmp_path / "hf", tmp_path / "imported")
    imported = Tokenizer.from_dir(tmp_path / "imported")
    assert imported.config["chat_template"] == ours.config["chat_template"]
    fmt = build_template(TemplateConfig(kind="chat"), imported.config)
    assert encode_prompt(imported, fmt, "What is a cat?") == hf.apply_chat_template(
        SINGLE[:1], add_generation_prompt=True, tokenize=True, return_dict=False)


def test_a_template_that_prints_todays_date_renders_one_fixed_date():
    """Llama 3.x templates print `strftime_now("%d %b %Y")`: rendered with today's date,
    training text, its resume and inference would differ from day to day."""
    dated = JinjaChat("{{ strftime_now('%d %b %Y') }}|{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert dated.render(SINGLE) == "26 Jul 2024|What is a cat?A small animal."


def test_a_template_that_refuses_a_system_message_names_template_system():
    mistral_like = {"chat_template": "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception("
                                     "'Conversation roles must alternate user/assistant') }}{% endif %}"
                                     "{{ m['content'] }}{% endfor %}"}
    assert build_template(TemplateConfig(kind="chat"), mistral_like).system == ""
    with pytest.raises(ConfigError, match=r"^template.system: is set, but the tokenizer's chat template refuses it .*"
                                          r"\(the chat template failed: Conversation roles must alternate"):
        build_template(TemplateConfig(kind="chat", system="Be nice."), mistral_like)


def test_a_conversation_the_template_cannot_encode_is_an_error_naming_its_record(tokenizers):
    """A DataError (`orlhf STAGE: error: FILE:LINE: ...`, one line), not a bare ValueError's traceback."""
    ours, _ = tokenizers
    rewriting = {**ours.config, "chat_template": "{% for m in messages %}{% if loop.last %}{{ m['content'] }}"
                                                 "{% endif %}{% endfor %}"}
    fmt = build_template(TemplateConfig(kind="chat"), rewriting)
    with pytest.raises(DataError, match=r"^chats\.jsonl:7: the tokenizer's chat template cannot encode it: .*"
                                        r"earlier text changes"):
        encode_sft(ours, fmt, "What is a cat?", "A small animal.", 4096, "chats.jsonl:7")


SYSTEM_CHAT = {"messages": [{"role": "system", "content": " Answer briefly. "},
                            {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}


def _system_example(template):
    """The one example of a chat-format record that opens with its own system message."""
    [example] = messages_examples([(Location("chats.jsonl", 1), SYSTEM_CHAT)], "messages", template, Skips(), "t")
    return example


def test_a_records_own_system_message_is_its_system_turn_under_a_chat_template(tokenizers):
    """A dataset's system message (`messages` rows, a prompt's `turns`, an API request) is
    rendered as the template's system message, in place of template.system; the paper's
    format folds it into the first user turn, as it always did."""
    ours, _ = tokenizers
    example = _system_example(ChatTemplate())
    assert example.prompt == "Answer briefly.\n\nName a colour."  # what every reader gave before
    assert example.turns == (("system", "Answer briefly."), ("user", "Name a colour."))
    chat = JinjaChat.of(ours.config)
    for system in ("", "Be verbose."):  # the record's own replaces template.system
        fmt = build_template(TemplateConfig(kind="chat", system=system), ours.config)
        sample = encode_sft(ours, fmt, example.prompt, example.response, 4096, "t", turns=example.turns)
        assert sample == encode_chat(ours, chat, MULTI[:3], 4096, "t")
        prompt = encode_prompt(ours, fmt, example.prompt, turns=example.turns)
        assert prompt == encode_chat_prompt(ours, chat, MULTI[:2])


def test_a_template_without_system_messages_gets_a_records_system_text_in_its_first_user_turn():
    """Where the template refuses a system message (Mistral's, Gemma 2's raise), a record's
    own is folded as the paper's format folds it, instead of failing every such record."""
    refusing = {"chat_template": "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception("
                                 "'System role not supported') }}{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n"
                                 "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"}
    fmt = build_template(TemplateConfig(kind="chat"), refusing)
    assert not fmt.system_turns and build_template(TemplateConfig(kind="chat"), {"chat_template": CHATML}).system_turns
    broken = {"chat_template": "{{ raise_exception('broken for every conversation') }}"}
    assert build_template(TemplateConfig(kind="chat", system="S"), broken).system_turns  # not the system's fault
    example = _system_example(fmt)
    assert fmt.chat.prompt(fmt.messages(example.prompt, example.turns)) == \
        "[user] Answer briefly.\n\nName a colour.\n[assistant] "


def test_a_conversation_cut_to_fit_keeps_its_own_system_turn(tokenizers):
    ours, _ = tokenizers
    fmt = build_template(TemplateConfig(kind="chat"), ours.config)
    turns = [(m["role"], m["content"]) for m in MULTI[:-1]]  # system, user, assistant, user
    whole = encode_prompt(ours, fmt, "folded", turns=turns)
    recent = encode_prompt(ours, fmt, "folded", turns=[turns[0], turns[3]])
    assert fit_prompt(ours, fmt, "folded", len(whole) - 1, turns=turns) == (recent, True)
    assert "Answer briefly." in ours.decode(recent, skip_special_tokens=False)
    for template in (fmt, ChatTemplate()):  # a paper-format model keeps the folded system text too
        ids, cut = fit_prompt(ours, template, "folded", len(encode_prompt(ours, template, "f", turns=turns)) - 1,
                              turns=turns)
        assert cut and "Answer briefly." in ours.decode(ids, skip_special_tokens=False)


def test_replies_after_a_system_message_take_their_prompt_from_the_prompt_column():
    """UltraFeedback-style pairs whose conversations hold a system message and the reply
    only: the prompt column is the user turn (was: an error stopping the whole read)."""
    reply = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Four."}]
    record = {"prompt": "What is 2+2?", "chosen": reply, "rejected": [reply[0], {"role": "assistant", "content": "5"}]}
    [pair] = chat_pairs([(Location("prefs.jsonl", 1), record)], "prompt", "chosen", "rejected", ChatTemplate(),
                        Skips(), "t")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Be brief.\n\nWhat is 2+2?", "Four.", "5")
    assert pair.turns == (("system", "Be brief."), ("user", "What is 2+2?"))
