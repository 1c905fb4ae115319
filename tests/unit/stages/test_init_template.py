"""Stages that continue a checkpoint (align, reference, PPO) render with the template it was
trained with: a default config adopts the recorded one, a config asking for another is one
error naming the key to set and the recorded value; models that read another's token ids
(PPO's services) must record the same template."""

import pytest

from offline_rlhf.checkpoint import TEMPLATE, CheckpointMeta, TrainState, resolve_checkpoint, save_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import InitConfig, TemplateConfig
from offline_rlhf.data.chat_template import ChatFormat, template_record
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.stage_support import init_template, require_template
from tests.fixtures import reference_model
from tests.synthetic_preferences import MODEL, synthetic_chat_tokenizer

CHAT = {"kind": "chat", "system": ""}
QA = {"kind": "paper", "user_tag": "Q:", "assistant_tag": "A:", "sep": " "}


@pytest.fixture
def checkpoints(tmp_path):
    """Checkpoints recording a chat template, a paper one with its own tags, and none."""
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer = synthetic_chat_tokenizer(tokenizer_dir)
    for name, metadata in (("chat", {TEMPLATE: CHAT}), ("qa", {TEMPLATE: QA}), ("imported", {})):
        save_checkpoint(tmp_path / name, reference_model(MODEL, "lm"),
                        CheckpointMeta(MODEL, "lm", TrainState(step=1), metadata=metadata), tokenizer_dir=tokenizer_dir)
    return tmp_path, tokenizer.config


def test_a_default_config_adopts_the_recorded_template(checkpoints):
    root, tokenizer_config = checkpoints
    chat = init_template(InitConfig(checkpoint=str(root / "chat")), TemplateConfig(), "data.template", tokenizer_config)
    assert isinstance(chat, ChatFormat) and template_record(chat) == CHAT
    qa = init_template(InitConfig(checkpoint=str(root / "qa")), TemplateConfig(), "template", tokenizer_config)
    assert qa == ChatTemplate("Q:", "A:", " ")


def test_a_config_that_says_what_the_checkpoint_records_is_accepted(checkpoints):
    root, tokenizer_config = checkpoints
    chat = init_template(InitConfig(checkpoint=str(root / "chat")), TemplateConfig(kind="chat"), "template",
                         tokenizer_config)
    assert template_record(chat) == CHAT
    qa = init_template(InitConfig(checkpoint=str(root / "qa")), TemplateConfig(user_tag="Q:", assistant_tag="A:"),
                       "template", tokenizer_config)
    assert qa == ChatTemplate("Q:", "A:", " ")


@pytest.mark.parametrize("name,configured,message", [
    ("chat", TemplateConfig(user_tag="Q:"),
     "data.template.kind: is 'paper', but {path} was trained with kind='chat' (its metadata.template: "
     "{{'kind': 'chat', 'system': ''}}); set data.template.kind=chat, or leave data.template at its default to "
     "use the checkpoint's"),
    ("chat", TemplateConfig(kind="chat", system="Be brief."),
     "data.template.system: is 'Be brief.', but {path} was trained with system=''"),
    ("qa", TemplateConfig(kind="chat"), "data.template.kind: is 'chat', but {path} was trained with kind='paper'"),
    ("qa", TemplateConfig(user_tag="Human:", assistant_tag="A:"),
     "data.template.user_tag: is 'Human:', but {path} was trained with user_tag='Q:'"),
])
def test_a_config_asking_for_another_template_names_the_key_and_the_recorded_value(checkpoints, name, configured,
                                                                                   message):
    root, tokenizer_config = checkpoints
    with pytest.raises(ConfigError) as error:
        init_template(InitConfig(checkpoint=str(root / name)), configured, "data.template", tokenizer_config)
    assert str(error.value).startswith(message.format(path=resolve_checkpoint(root / name)))
    if name == "qa" and configured.user_tag == "Human:":
        assert "set data.template.user_tag='Q:'" in str(error.value)


def test_without_a_recorded_template_the_configured_one_is_used(checkpoints):
    root, tokenizer_config = checkpoints
    configured = TemplateConfig(user_tag="Human:")
    for init in (InitConfig(checkpoint=str(root / "imported")), InitConfig(checkpoint="", tokenizer="t")):
        assert init_template(init, configured, "template", tokenizer_config) == ChatTemplate("Human:", "Assistant:")
    chat = init_template(InitConfig(checkpoint=str(root / "imported")), TemplateConfig(kind="chat"), "template",
                         tokenizer_config)
    assert isinstance(chat, ChatFormat)


def test_a_reader_of_token_ids_must_record_the_writers_template(tmp_path):
    require_template(tmp_path, {TEMPLATE: CHAT}, CHAT, "services.reward.checkpoint", "the policy")
    require_template(tmp_path, {}, QA, "services.reward.checkpoint", "the policy")  # imported: taken as given
    with pytest.raises(ConfigError) as error:
        require_template(tmp_path, {TEMPLATE: QA}, CHAT, "services.reward.checkpoint", "the policy (sft)")
    assert str(error.value).startswith(f"services.reward.checkpoint: {tmp_path} was trained with template "
                                       "kind='paper', but the policy (sft) renders with kind='chat'")
    assert str(error.value).endswith("; pass a model trained with data.template.kind=chat")
    with pytest.raises(ConfigError, match="system='Be brief.', but the policy renders with system=''"):
        require_template(tmp_path, {TEMPLATE: {**CHAT, "system": "Be brief."}}, CHAT, "services.critic.checkpoint",
                         "the policy")
