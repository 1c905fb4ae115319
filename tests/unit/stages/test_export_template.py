"""The template a model was trained with travels with it: later stages render with the
checkpoint's recorded template, and `orlhf convert export_hf` gives a paper-format model a
chat template that renders that format through transformers' apply_chat_template."""

import json

import pytest
from transformers import AutoTokenizer

from offline_rlhf.checkpoint import TEMPLATE, CheckpointMeta, TrainState, resolve_checkpoint, save_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import TemplateConfig
from offline_rlhf.data.chat_template import ChatFormat, JinjaChat, jinja_string, template_record, with_default_system
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_prompt
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from offline_rlhf.stage_support import checkpoint_template
from offline_rlhf.stages.convert import export_hf, special_token_ids
from tests.fixtures import reference_model
from tests.synthetic_preferences import MODEL, synthetic_tokenizer


def export(tmp_path, metadata):
    tokenizer_dir = tmp_path / "tokenizer"
    synthetic_tokenizer(tokenizer_dir)
    root = tmp_path / "ckpt"
    save_checkpoint(root, reference_model(MODEL, "lm"), CheckpointMeta(MODEL, "lm", TrainState(step=1),
                                                                      metadata=metadata), tokenizer_dir=tokenizer_dir)
    return export_hf(root, tmp_path / "hf"), Tokenizer.from_dir(tokenizer_dir)


def test_a_paper_format_export_prompts_as_training_did(tmp_path):
    template = ChatTemplate("Q:", "A:", " ")
    out, tokenizer = export(tmp_path, {TEMPLATE: template_record(template)})
    hf = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "good music"}]
    assert hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        encode_prompt(tokenizer, template, "good music")


def test_a_model_not_trained_here_keeps_its_tokenizer_as_it_was(tmp_path):
    out, _ = export(tmp_path, {})
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_later_stages_render_with_the_template_the_checkpoint_records(tmp_path):
    """generate, eval and serve take a checkpoint's recorded template; their own setting
    applies to one that records none. Set to another, it is an error (generate, serve) or,
    for eval's one setting for several models, a fallback only (key None)."""
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer = synthetic_tokenizer(tokenizer_dir)
    tokenizer.config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save(tokenizer_dir)
    for name, metadata in (("chat", {TEMPLATE: {"kind": "chat", "system": "Be brief."}}), ("plain", {})):
        save_checkpoint(tmp_path / name, reference_model(MODEL, "lm"),
                        CheckpointMeta(MODEL, "lm", TrainState(step=1), metadata=metadata), tokenizer_dir=tokenizer_dir)
    configured = TemplateConfig(user_tag="Q:", assistant_tag="A:")
    recorded = {TEMPLATE: {"kind": "chat", "system": "Be brief."}}
    path = resolve_checkpoint(tmp_path / "chat")
    with pytest.raises(ConfigError, match=r"^template.kind: is 'paper', but .* was trained with kind='chat'"):
        checkpoint_template(path, recorded, configured)
    for chat in (checkpoint_template(path, recorded, configured, key=None),
                 checkpoint_template(path, recorded, TemplateConfig())):
        assert isinstance(chat, ChatFormat) and chat.system == "Be brief."
    assert checkpoint_template(resolve_checkpoint(tmp_path / "plain"), {}, configured) == ChatTemplate("Q:", "A:", " ")


def test_a_chat_model_whose_end_of_turn_is_not_eos_exports_both_as_eos_token_id(tmp_path):
    from tests.unit.data.test_chat_template import CHATML

    folder = tmp_path / "tok"
    tokenizer = chat_tokenizer(tmp_path, folder, CHATML)
    im_end = tokenizer.backend.token_to_id("<|im_end|>")
    chat = special_token_ids(folder, {"kind": "chat", "system": ""})
    assert chat["eos_token_id"] == [tokenizer.eos_id, im_end] and tokenizer.eos_id != im_end
    assert special_token_ids(folder, {"kind": "paper"})["eos_token_id"] == tokenizer.eos_id
    assert special_token_ids(folder)["eos_token_id"] == tokenizer.eos_id


SYSTEM = "Be brief. 'Quoted' \"twice\", a back\\slash,\nanother line and 😀 past U+FFFF."


def chat_tokenizer(tmp_path, folder, chat_template):
    """A small BPE with ChatML's special tokens and `chat_template`, saved in `folder`."""
    from tests.unit.data.test_chat_template import SPECIALS

    (tmp_path / "corpus.txt").write_text("hello there, how are you\n" * 20)
    tokenizer = train_bpe_tokenizer([tmp_path / "corpus.txt"], 300, folder, special_tokens=SPECIALS)
    tokenizer.config["chat_template"] = chat_template
    tokenizer.save(folder)
    return tokenizer


def chat_checkpoint(tmp_path, chat_template, jinja_file: bool = False, metadata=None):
    """A checkpoint of a chat model (by default trained with template.system=SYSTEM), its
    template in tokenizer_config.json or (transformers >= 4.50) in chat_template.jinja;
    exported. Returns the export's folder and the checkpoint's tokenizer."""
    folder = tmp_path / "tokenizer"
    chat_tokenizer(tmp_path, folder, chat_template)
    if jinja_file:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "chat_template.jinja").write_text(config.pop("chat_template"))
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    root = tmp_path / "ckpt"
    metadata = metadata or {TEMPLATE: {"kind": "chat", "system": SYSTEM}}
    save_checkpoint(root, reference_model(MODEL, "lm"), CheckpointMeta(MODEL, "lm", TrainState(step=1),
                                                                      metadata=metadata), tokenizer_dir=folder)
    return export_hf(root, tmp_path / "hf"), Tokenizer.from_dir(folder)


@pytest.mark.parametrize("jinja_file", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
def test_a_chat_export_puts_the_trained_system_message_first_unless_the_caller_sends_one(tmp_path, jinja_file):
    from tests.unit.data.test_chat_template import CHATML

    out, tokenizer = chat_checkpoint(tmp_path, CHATML, jinja_file)
    hf = AutoTokenizer.from_pretrained(out)
    trained = ChatFormat(JinjaChat.of(tokenizer.config), SYSTEM)
    question = [{"role": "user", "content": "good music"}]
    assert hf.apply_chat_template(question, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        encode_prompt(tokenizer, trained, "good music")
    own = [{"role": "system", "content": "Answer in French."}, *question]
    assert hf.apply_chat_template(own, add_generation_prompt=True, tokenize=False) == \
        JinjaChat.of(tokenizer.config).render(own, add_generation_prompt=True)  # the caller's, alone
    assert (out / "chat_template.jinja").is_file() == jinja_file


def test_a_chat_export_keeps_the_other_named_templates(tmp_path):
    from tests.unit.data.test_chat_template import CHATML

    tool_use = "{{ 'tools' }}"
    out, tokenizer = chat_checkpoint(tmp_path, [{"name": "default", "template": CHATML},
                                                {"name": "tool_use", "template": tool_use}])
    exported = {named["name"]: named["template"] for named in
                json.loads((out / "tokenizer_config.json").read_text())["chat_template"]}
    assert exported["tool_use"] == tool_use
    assert exported["default"] == with_default_system(CHATML, SYSTEM)


def test_a_jinja_string_literal_renders_back_to_its_text():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    assert ImmutableSandboxedEnvironment().from_string("{{ " + jinja_string(SYSTEM) + " }}").render() == SYSTEM


DT = {"alignment": {"method": "dt", "dt_target": 1.5}}


def test_a_decision_transformer_export_prompts_with_its_reward_prompt(tmp_path):
    """`orlhf align method=dt` trained the model to answer after `<rm_score> 1.5`; serve and
    eval add it, and so does the exported template's generation prompt (it was left out)."""
    template = ChatTemplate("Q:", "A:", " ")
    out, tokenizer = export(tmp_path, {TEMPLATE: template_record(template), **DT})
    hf = AutoTokenizer.from_pretrained(out)
    question = [{"role": "user", "content": "good music"}]
    assert hf.apply_chat_template(question, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        encode_prompt(tokenizer, template, "good music", template.reward_prompt(1.5))
    answered = [*question, {"role": "assistant", "content": "jazz"}]
    assert "<rm_score>" not in hf.apply_chat_template(answered, tokenize=False)  # only where an answer starts


def test_a_chat_decision_transformer_export_keeps_its_template_and_adds_the_reward_prompt(tmp_path):
    from tests.unit.data.test_chat_template import CHATML

    out, tokenizer = chat_checkpoint(tmp_path, CHATML, metadata={TEMPLATE: {"kind": "chat", "system": ""}, **DT})
    hf = AutoTokenizer.from_pretrained(out)
    chat = ChatFormat(JinjaChat.of(tokenizer.config))
    question = [{"role": "user", "content": "good music"}]
    assert hf.apply_chat_template(question, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        encode_prompt(tokenizer, chat, "good music", chat.reward_prompt(1.5))
