"""`template.kwargs`: variables every chat-template rendering passes, as transformers'
`apply_chat_template(..., **kwargs)` does (Qwen3's `enable_thinking=False` moves the empty
reasoning block from the answer into the generation prompt). They shape prompts, the spans
trained on, the end-of-turn marker and the system-message check; checkpoints record them
and every later stage restores them; an export bakes them in as defaults, so
`apply_chat_template(messages, add_generation_prompt=True)` prompts as training did."""

import json

import jinja2
import pytest
from transformers import AutoTokenizer

from offline_rlhf.checkpoint import TEMPLATE, CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import TemplateConfig
from offline_rlhf.data.chat_template import (
    JinjaChat,
    build_template,
    jinja_literal,
    template_record,
    with_default_variables,
)
from offline_rlhf.data.tokenize import IGNORE_INDEX, encode_prompt, encode_sft
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.stage_support import check_configured, require_template
from offline_rlhf.stages.convert import export_hf
from tests.fixtures import reference_model
from tests.real_tokenizers import real_tokenizer_dir
from tests.synthetic_preferences import MODEL
from tests.unit.data.test_chat_template import MULTI, SINGLE
from tests.unit.stages.test_export_template import chat_checkpoint, chat_tokenizer

# Qwen3's behaviour in small: the last answer opens with an empty reasoning block, which the
# generation prompt writes instead when `enable_thinking` is false.
THINKING = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
            "{%- if m['role'] == 'assistant' %}{{- '<think></think>' }}{%- endif %}"
            "{{- m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
            "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think></think>' }}{%- endif %}"
            "{%- endif %}")
CONFIG = {"chat_template": THINKING, "eos_token": "<|eos|>"}
NO_THINKING = {"enable_thinking": False}
QUESTION = SINGLE[:1]


def chat(kwargs=None, system=""):
    return build_template(TemplateConfig(kind="chat", system=system, kwargs=kwargs or {}), CONFIG)


def test_every_rendering_passes_the_variables():
    thinking, plain = chat(), chat(NO_THINKING)
    assert thinking.chat.prompt(QUESTION).endswith("<|im_start|>assistant\n")
    assert plain.chat.prompt(QUESTION).endswith("<|im_start|>assistant\n<think></think>")
    for fmt, trained in ((thinking, "<think></think>A small animal.<|im_end|>\n"),
                         (plain, "A small animal.<|im_end|>\n")):
        rendering = fmt.chat.conversation(SINGLE)
        (start, end), = rendering.spans
        assert rendering.text[start:end] == trained
        assert rendering.text[:start] == fmt.chat.prompt(QUESTION)
        assert fmt.end_of_turn() == "<|im_end|>\n"
    listed = JinjaChat("{{ depth | tojson }} {{ flags.on }}",
                       kwargs=(("depth", [1, {"a": None}]), ("flags", {"on": 1})))
    assert listed.render([]) == '[1, {"a": null}] 1'


def test_the_system_message_check_renders_with_the_variables():
    """A template may refuse a system message only under some variable's value: the check at
    config time must render as every later rendering does."""
    strict = {"chat_template": "{%- if strict and messages[0]['role'] == 'system' %}"
                               "{{- raise_exception('no system message when strict') }}{%- endif %}" + THINKING}
    assert build_template(TemplateConfig(kind="chat", system="Be brief.", kwargs={"strict": False}), strict).system
    with pytest.raises(ConfigError, match=r"^template.system: is set, .*no system message when strict"):
        build_template(TemplateConfig(kind="chat", system="Be brief.", kwargs={"strict": True}), strict)


def test_encoding_labels_the_answer_as_the_variables_render_it(tmp_path):
    tokenizer = chat_tokenizer(tmp_path, tmp_path / "tok", THINKING)
    fmt = build_template(TemplateConfig(kind="chat", kwargs=NO_THINKING), tokenizer.config)
    sample = encode_sft(tokenizer, fmt, "hello there", "how are you", 256, "t")
    labelled = tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX], skip_special_tokens=False)
    assert labelled == "how are you<|im_end|>\n"
    assert tokenizer.decode(encode_prompt(tokenizer, fmt, "hello there"), skip_special_tokens=False).endswith(
        "assistant\n<think></think>")


def test_a_checkpoint_records_the_variables_and_later_stages_restore_them():
    fmt = chat(NO_THINKING | {"depth": [1, {"a": None}]}, system="Be brief.")
    record = template_record(fmt)
    assert record == {"kind": "chat", "system": "Be brief.", "kwargs": {"enable_thinking": False,
                                                                         "depth": [1, {"a": None}]}}
    stored = json.loads(json.dumps(record))  # checkpoint metadata is JSON
    assert build_template(stored, CONFIG) == fmt
    assert build_template(stored, CONFIG).chat.prompt(QUESTION) == fmt.chat.prompt(QUESTION)
    # Without variables the record is what it was before they existed, and an old one loads as none.
    assert template_record(chat()) == {"kind": "chat", "system": ""}
    assert build_template({"kind": "chat", "system": ""}, CONFIG).chat.kwargs == ()


def test_a_config_with_other_variables_than_the_checkpoint_names_the_key(tmp_path):
    recorded = template_record(chat(NO_THINKING))
    check_configured(recorded, TemplateConfig(kind="chat", kwargs=NO_THINKING), "data.template", tmp_path)
    check_configured(recorded, TemplateConfig(), "data.template", tmp_path)  # the default adopts it
    with pytest.raises(ConfigError, match=r"^data.template.kwargs: is \{\}, but .* was trained with "
                                          r"kwargs=\{'enable_thinking': False\} .*; set "
                                          r"data.template.kwargs=\{enable_thinking: false\}, or leave"):
        check_configured(recorded, TemplateConfig(kind="chat"), "data.template", tmp_path)
    with pytest.raises(ConfigError, match=r"trained with kwargs=\{'enable_thinking': False\} .*\); leave "
                                          r"data.template at its default"):  # a dict override would keep `depth`
        check_configured(recorded, TemplateConfig(kind="chat", kwargs={"depth": 1}), "data.template", tmp_path)
    words = template_record(chat({"mode": "true", "name": "deep"}))  # strings an override would not read as such
    with pytest.raises(ConfigError, match=r"; set data.template.kwargs=\{mode: 'true', name: deep\}, or leave"):
        check_configured(words, TemplateConfig(kind="chat"), "data.template", tmp_path)
    old = {"kind": "chat", "system": ""}  # a checkpoint from before template.kwargs
    with pytest.raises(ConfigError, match=r"^template.kwargs: is \{'enable_thinking': False\}, but .* was "
                                          r"trained with kwargs=\{\} \(its metadata.template: "
                                          r"\{'kind': 'chat', 'system': ''\}\)"):
        check_configured(old, TemplateConfig(kind="chat", kwargs=NO_THINKING), "template", tmp_path)
    with pytest.raises(ConfigError, match=r"^services.reward.checkpoint: .* was trained with template kwargs=\{\}, "
                                          r"but the policy renders with kwargs=\{'enable_thinking': False\}"):
        require_template(tmp_path, {TEMPLATE: old}, recorded, "services.reward.checkpoint", "the policy")
    require_template(tmp_path, {TEMPLATE: recorded}, recorded, "services.reward.checkpoint", "the policy")
    require_template(tmp_path, {TEMPLATE: old}, template_record(chat()), "services.reward.checkpoint", "the policy")


@pytest.mark.parametrize("value", [False, True, None, 0, -3, 2.5, -1e-7, 1e20, "", "it's \"quoted\"\n😀",
                                   [], [1, [None, "x"]], {}, {"a b": {"c": [False]}}])
def test_a_jinja_literal_renders_back_to_its_value(value):
    """JSON's `null` is no Jinja literal (it reads as an undefined variable): `none` is."""
    assert jinja_literal(None) == "none"
    template = with_default_variables("{{ v is none }}|{{ v | tojson }}", {"v": value})
    is_none, text = jinja2.Environment().from_string(template).render().split("|", 1)
    assert is_none == str(value is None) and json.loads(text) == value


def test_an_export_bakes_the_variables_in_as_defaults_a_caller_may_override(tmp_path):
    metadata = {TEMPLATE: {"kind": "chat", "system": "Be brief.", "kwargs": NO_THINKING}}
    out, tokenizer = chat_checkpoint(tmp_path, THINKING, metadata=metadata)
    hf = AutoTokenizer.from_pretrained(out)
    trained = build_template(metadata[TEMPLATE], tokenizer.config)
    assert hf.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == \
        trained.chat.prompt(trained.messages("What is a cat?"))
    assert hf.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        encode_prompt(tokenizer, trained, "What is a cat?")
    thinking = hf.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False, enable_thinking=True)
    assert thinking.endswith("<|im_start|>assistant\n")  # the caller's value wins


# The real Qwen3 tokenizer and template (tests/real_tokenizers.py) against transformers.
QWEN3_ANSWER_END = "<|im_end|>\n"


@pytest.fixture(scope="module")
def qwen3():
    folder = real_tokenizer_dir("qwen3")
    return folder, Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_qwen3_without_thinking_prompts_and_labels_as_transformers_renders(qwen3, messages):
    _, ours, hf = qwen3
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    fmt = build_template(TemplateConfig(kind="chat", system=system, kwargs=NO_THINKING), ours.config)
    history = [(m["role"], m["content"]) for m in messages[1 if system else 0:-1]]
    prompt = hf.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert fmt.chat.prompt(fmt.messages("", history)) == prompt
    assert encode_prompt(ours, fmt, "folded", "", history) == hf.apply_chat_template(
        messages[:-1], add_generation_prompt=True, enable_thinking=False, return_dict=True)["input_ids"]
    sample = encode_sft(ours, fmt, "folded", messages[-1]["content"], 4096, "real", turns=history)
    assert list(sample.input_ids) == hf.apply_chat_template(messages, enable_thinking=False,
                                                            return_dict=True)["input_ids"]
    labelled = ours.decode([t for t in sample.labels if t != IGNORE_INDEX], skip_special_tokens=False)
    assert labelled == messages[-1]["content"] + QWEN3_ANSWER_END  # no reasoning block trained on
    assert fmt.end_of_turn() == QWEN3_ANSWER_END


def test_a_qwen3_export_prompts_without_thinking_when_the_caller_passes_nothing(qwen3, tmp_path):
    folder, ours, _ = qwen3
    record = template_record(build_template(TemplateConfig(kind="chat", kwargs=NO_THINKING), ours.config))
    save_checkpoint(tmp_path / "ckpt", reference_model(MODEL, "lm"),
                    CheckpointMeta(MODEL, "lm", TrainState(step=1), metadata={TEMPLATE: record}), tokenizer_dir=folder)
    exported = AutoTokenizer.from_pretrained(export_hf(tmp_path / "ckpt", tmp_path / "hf"))
    trained = build_template(record, ours.config)
    for messages in (QUESTION, MULTI[:-1], MULTI[1:-1]):
        prompt = trained.chat.prompt(messages)
        assert exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not exported.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False,
                                            enable_thinking=True).endswith("</think>\n\n")
