"""What `orlhf serve` takes from a checkpoint: its name, template and DT reward prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from offline_rlhf.checkpoint import resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ParallelConfig, TemplateConfig
from offline_rlhf.config.serving import ServeConfig
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.serving.model import default_name, dt_target, load_served_model
from offline_rlhf.serving.protocol import chat_turns
from tests.fixtures import runtime_for
from tests.synthetic_preferences import MODEL
from tests.unit.serving.tiny import make_tokenizer, write_lm_checkpoint, write_thinking_chat_checkpoint

QA = TemplateConfig(user_tag="Q:", assistant_tag="A:")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("serve_model") / "tokenizer")


def served(ckpt: Path, tmp_path: Path, **settings):
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None, tmp_path / "serve")
    return load_served_model(ServeConfig(ckpt=str(ckpt), **settings), resolve_checkpoint(ckpt), rt)


def test_names_come_from_the_stage_folder_or_the_checkpoint_root(tmp_path):
    assert default_name(tmp_path / "run" / "align_dt" / "checkpoints" / "step_00000100") == "align_dt"
    assert default_name(tmp_path / "run" / "sft" / "checkpoints") == "sft"
    assert default_name(tmp_path / "ckpts" / "llama-8b" / "step_00000000") == "llama-8b"


def test_only_a_dt_checkpoint_has_a_target_score(tmp_path):
    assert dt_target({"alignment": {"method": "dt", "dt_target": 4}}, tmp_path) == 4.0
    assert dt_target({"config": {"method": "dt", "dt_target": 2.5}}, tmp_path) == 2.5  # an intermediate step
    assert dt_target({"alignment": {"method": "rwr", "dt_target": None}}, tmp_path) is None
    assert dt_target({"alignment": {"method": "ppo"}}, tmp_path) is None and dt_target({}, tmp_path) is None
    with pytest.raises(ConfigError, match="reward_prompt: .* records no target score"):
        dt_target({"alignment": {"method": "dt", "dt_target": None}}, tmp_path)


def test_a_dt_checkpoint_answers_behind_its_reward_prompt(tokenizer_dir, tmp_path):
    dt = write_lm_checkpoint(tmp_path / "align_dt" / "checkpoints", tokenizer_dir,
                             metadata={"alignment": {"method": "dt", "dt_target": 5.0}})
    model = served(dt, tmp_path)
    assert model.name == "align_dt" and model.reward_prefix == " <rm_score> 5.0"
    assert model.tokenizer.decode(model.chat_prompt([("user", "hi")])) == "User: hi Assistant: <rm_score> 5.0"
    assert served(dt, tmp_path, reward_prompt=-1.25, model_name="x").reward_prefix == " <rm_score> -1.2"


def test_the_checkpoints_template_is_served_and_another_configured_one_refused(tokenizer_dir, tmp_path):
    plain = write_lm_checkpoint(tmp_path / "sft" / "checkpoints", tokenizer_dir)
    assert served(plain, tmp_path).reward_prefix == ""
    custom = served(plain, tmp_path, template=QA)
    assert custom.tokenizer.decode(custom.chat_prompt([("user", "hi")])) == "Q: hi A:"
    recorded = write_lm_checkpoint(tmp_path / "rec" / "checkpoints", tokenizer_dir,
                                   metadata={"template": {"user_tag": "Human:", "assistant_tag": "Bot:", "sep": " "}})
    with pytest.raises(ConfigError, match=r"^template.user_tag: is 'Q:', but .* was trained with user_tag='Human:'"):
        served(recorded, tmp_path, template=QA)
    model = served(recorded, tmp_path)
    assert model.tokenizer.decode(model.chat_prompt([("user", "hi"), ("assistant", "yo"), ("user", "ok")])) == \
        "Human: hi Bot: yo Human: ok Bot:"


def test_a_checkpoint_without_its_tokenizer_is_refused(tmp_path):
    from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
    from tests.fixtures import reference_model

    bare = tmp_path / "bare" / "checkpoints"
    save_checkpoint(bare, reference_model(MODEL, "lm"), CheckpointMeta(MODEL, "lm", TrainState(step=1)))
    with pytest.raises(ConfigError, match="has no tokenizer/ folder"):
        served(bare, tmp_path)


def test_a_chat_template_checkpoint_renders_the_conversation_turn_by_turn(tokenizer_dir, tmp_path):
    """A model trained with template.kind=chat is served with its conversation's own turns,
    as its chat template renders them (not folded into one user message)."""
    chat_tokenizer = tmp_path / "chat_tokenizer"
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    tokenizer.config["chat_template"] = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    tokenizer.save(chat_tokenizer)
    ckpt = write_lm_checkpoint(tmp_path / "sft" / "checkpoints", chat_tokenizer,
                               metadata={"template": {"kind": "chat", "system": ""}})
    model = served(ckpt, tmp_path)
    turns = [("user", "good music"), ("assistant", "the river"), ("user", "and the stone")]
    assert model.chat_prompt(turns) == tokenizer.encode(
        "[user] good music\n[assistant] the river\n[user] and the stone\n[assistant] ")
    # A request's system messages are the template's system message, not text in the user turn.
    request = chat_turns([{"role": "system", "content": "be brief"}, {"role": "developer", "content": "be kind"},
                          {"role": "user", "content": "good music"}])
    assert model.chat_prompt(request) == tokenizer.encode(
        "[system] be brief\n\nbe kind\n[user] good music\n[assistant] ")


def test_a_requests_template_variables_go_over_the_ones_the_model_was_trained_with(tokenizer_dir, tmp_path):
    """A request's chat_template_kwargs (Qwen3's enable_thinking) over template.kwargs."""
    ckpt = write_thinking_chat_checkpoint(tmp_path / "sft" / "checkpoints", tokenizer_dir, tmp_path / "chat_tok")
    tokenizer = Tokenizer.from_dir(tmp_path / "chat_tok")
    model = served(ckpt, tmp_path)
    turns = [("user", "good music")]
    assert model.chat_prompt(turns) == model.chat_prompt(turns, {}) == \
        tokenizer.encode("[user] good music\n[assistant] [quick] ")
    assert model.chat_prompt(turns, {"thinking": True}) == tokenizer.encode("[user] good music\n[assistant] ")
    assert model.chat_prompt(turns) == tokenizer.encode("[user] good music\n[assistant] [quick] ")  # per request


def test_warm_up_decodes_one_and_two_rows_with_the_configured_decoding_and_counts_nothing(
        tokenizer_dir, tmp_path, monkeypatch):
    from offline_rlhf.serving import batcher as batching

    model = served(write_lm_checkpoint(tmp_path / "sft" / "checkpoints", tokenizer_dir), tmp_path)
    calls = []
    real_run = batching.run

    def recording_run(model, requests, cfg, *args, session, **kwargs):
        calls.append((len(requests), session.cfg.cuda_graphs, session.cfg.compile))
        return real_run(model, requests, cfg, *args, session=session, **kwargs)

    monkeypatch.setattr(batching, "run", recording_run)
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None, tmp_path / "serve")
    warm = batching.Batcher(model, rt, slots=4, cuda_graphs=True, compile_step=False)
    warm.warm_up()
    assert calls == [(1, True, False), (2, True, False)]
    assert (warm.generated, warm.batches) == (0, 0)
    assert warm.session.slots == 4  # every slot from the start: later batches replay what it captured
