"""The PPO actor prompts with the template its init (SFT) checkpoint was trained with, and
refuses a reward model, critic or reference trained with another one: they read the
policy's token ids, so they would score text laid out as they never saw it."""

from __future__ import annotations

import pytest

from offline_rlhf.checkpoint import TEMPLATE, CheckpointMeta, TrainState, resolve_checkpoint, save_checkpoint
from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.data.chat_template import ChatFormat, template_record
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from ppo_baseline.config import PPOConfig
from ppo_baseline.stage import load_prompts, policy_template
from tests.fixtures import reference_model
from tests.local_data import prompt_sources
from tests.synthetic_preferences import MODEL, synthetic_chat_tokenizer

CHAT = {"kind": "chat", "system": ""}
PAPER = {"kind": "paper", "user_tag": "User:", "assistant_tag": "Assistant:", "sep": " "}


@pytest.fixture
def models(tmp_path):
    """An SFT checkpoint recording a chat template; reward models recording chat and paper."""
    tokenizer_dir = tmp_path / "tokenizer"
    synthetic_chat_tokenizer(tokenizer_dir)
    for name, head, record in (("sft", "lm", CHAT), ("rm_chat", "value", CHAT), ("rm_paper", "value", PAPER)):
        save_checkpoint(tmp_path / name, reference_model(MODEL, head),
                        CheckpointMeta(MODEL, head, TrainState(step=1), metadata={TEMPLATE: record}),
                        tokenizer_dir=tokenizer_dir)
    corpus = tmp_path / "other_corpus.txt"  # another tokenizer of the same vocabulary size
    corpus.write_text("\n".join(f"token{i} word{i * 7} other text {i}" for i in range(400)))
    other = train_bpe_tokenizer([corpus], Tokenizer.from_dir(tokenizer_dir).vocab_size, tmp_path / "other_tokenizer")
    other.config["chat_template"] = Tokenizer.from_dir(tokenizer_dir).config["chat_template"]
    other.save(tmp_path / "other_tokenizer")
    save_checkpoint(tmp_path / "rm_other_tokenizer", reference_model(MODEL, "value"),
                    CheckpointMeta(MODEL, "value", TrainState(step=1), metadata={TEMPLATE: CHAT}),
                    tokenizer_dir=tmp_path / "other_tokenizer")
    return tmp_path


def ppo_config(root, reward="rm_chat", critic="rm_chat", *extra) -> PPOConfig:
    return compose_stage("ppo", PPOConfig, [f"run_dir={root}", prompt_sources(), f"init.checkpoint={root / 'sft'}",
                                            f"services.reference.checkpoint={root / 'sft'}",
                                            f"services.reward.checkpoint={root / reward}",
                                            f"services.critic.checkpoint={root / critic}", *extra])


def test_a_chat_sft_is_prompted_in_its_chat_template_under_a_default_config(models):
    cfg = ppo_config(models, "rm_chat", "rm_chat", "max_prompt_tokens=50000")
    template = policy_template(cfg, cfg.init, MODEL)
    assert isinstance(template, ChatFormat) and template_record(template) == CHAT
    tokenizer = Tokenizer.from_dir(models / "tokenizer")
    encoded, _ = load_prompts(cfg, tokenizer, template, cfg.max_prompt_tokens)
    assert all(tokenizer.decode(ids).startswith("[user] ") for ids in encoded)


@pytest.mark.parametrize("service", ["reward", "critic"])
def test_a_service_trained_with_another_template_is_refused_before_anything_loads(models, service):
    cfg = ppo_config(models, **{service: "rm_paper"})
    with pytest.raises(ConfigError) as error:
        policy_template(cfg, cfg.init, MODEL)
    assert str(error.value) == (
        f"services.{service}.checkpoint: {resolve_checkpoint(models / 'rm_paper')} was trained with template "
        f"kind='paper', but the policy ({models / 'sft'}) renders with kind='chat' (metadata.template {PAPER} vs "
        f"{CHAT}); pass a model trained with data.template.kind=chat")


def test_a_service_with_another_tokenizer_of_the_same_size_is_refused(models):
    cfg = ppo_config(models, "rm_other_tokenizer")
    sizes = {Tokenizer.from_dir(models / name).vocab_size for name in ("tokenizer", "other_tokenizer")}
    assert len(sizes) == 1  # the vocabulary size check alone would pass
    with pytest.raises(ConfigError, match=r"^services.reward.checkpoint: .*rm_other_tokenizer.* has another tokenizer "
                                          r"than the policy \(.*sft\) \([0-9]+ token ids stand for other tokens\); "
                                          r"pass a model trained with the policy's tokenizer$"):
        policy_template(cfg, cfg.init, MODEL)


def test_a_config_asking_for_another_template_than_the_sfts_is_refused(models):
    cfg = ppo_config(models, "rm_chat", "rm_chat", "template.user_tag=Q:")
    with pytest.raises(ConfigError, match=r"^template.kind: is 'paper', but .* was trained with kind='chat'.*; "
                                          r"set template.kind=chat, or leave template at its default"):
        policy_template(cfg, cfg.init, MODEL)

