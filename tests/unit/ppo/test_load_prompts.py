"""The PPO actor's prompts: a multi-turn prompt is encoded as its turns, as SFT rendered it;
prompts fit the shortest limit of the four modules."""

from __future__ import annotations

import dataclasses

import pytest

from offline_rlhf.checkpoint import REWARD_STATS, CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ParallelConfig, TemplateConfig
from offline_rlhf.data.chat_template import build_template
from offline_rlhf.data.sft_readers import read_sft_source
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_prompt
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from offline_rlhf.labeling.scoring import MAX_SEQ_LEN
from offline_rlhf.parallel.dims import ParallelDims
from ppo_baseline.config import PPOConfig
from ppo_baseline.stage import load_prompts, module_limits, prompt_limit
from tests.fixtures import reference_model, runtime_for
from tests.local_data import OASST_TREES, prompt_sources
from tests.synthetic_preferences import MODEL, synthetic_tokenizer
from tests.unit.data.test_chat_template import CHATML
from tests.unit.ppo.tiny_models import STATS, write_checkpoints


def test_multi_turn_prompts_are_encoded_with_their_turns(tmp_path):
    train_bpe_tokenizer([OASST_TREES], 400, tmp_path / "tok",
                        special_tokens=("<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"))
    tokenizer = Tokenizer.from_dir(tmp_path / "tok")
    tokenizer.config["chat_template"] = CHATML
    for kind in ("chat", "paper"):
        cfg = compose_stage("ppo", PPOConfig, [f"run_dir={tmp_path}", prompt_sources(), f"template.kind={kind}",
                                               "total_prompts=null", "max_prompt_tokens=50000"])
        template = build_template(TemplateConfig(kind=kind), tokenizer.config)
        encoded, ids = load_prompts(cfg, tokenizer, template, cfg.max_prompt_tokens)
        examples = read_sft_source("oasst", str(OASST_TREES), template=ChatTemplate())
        expected = [encode_prompt(tokenizer, template, e.prompt, turns=e.turns) for e in examples]
        assert sorted(ids) == list(range(len(examples))) and sorted(encoded) == sorted(expected)
        # The history as one user message: the paper's format renders it so, a chat template does not.
        folded = {tuple(encode_prompt(tokenizer, template, e.prompt)) for e in examples if e.turns}
        assert folded and (folded <= set(map(tuple, encoded))) == (kind == "paper")


def test_prompts_fit_the_smallest_limit_of_the_four_modules(tmp_path, capsys):
    """The reward service refuses rows beyond the length its model was trained on (recorded
    by `orlhf rm`), so that length, not the policy's, bounds the prompts: said in one line;
    a limit that leaves no room beside generation.max_new_tokens is refused at start."""
    tokenizer = synthetic_tokenizer(tmp_path / "tok")
    write_checkpoints(tmp_path, tmp_path / "tok")
    short = tmp_path / "rm_short" / "checkpoints"
    save_checkpoint(short, reference_model(MODEL, "value", seed=1),
                    CheckpointMeta(MODEL, "value", TrainState(step=1), metadata={REWARD_STATS: STATS, MAX_SEQ_LEN: 30}),
                    tokenizer_dir=tmp_path / "tok")
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None, tmp_path)
    cfg = compose_stage("ppo", PPOConfig, [f"run_dir={tmp_path}", prompt_sources(), "generation.max_new_tokens=8",
                                           f"services.reward.checkpoint={short}"])
    limits = module_limits(cfg, tokenizer, MODEL)
    assert limits == {"init.checkpoint": 64, "services.reward.checkpoint": 30, "services.reference.checkpoint": 64,
                      "services.critic.checkpoint": 64}
    assert prompt_limit(cfg, limits, rt) == 22
    assert capsys.readouterr().out == ("ppo: prompts are limited to 22 tokens: services.reward.checkpoint takes 30 "
                                       "tokens with generation.max_new_tokens=8; the policy takes 64\n")
    assert prompt_limit(cfg, {**limits, "services.reward.checkpoint": 64}, rt) == 56
    assert prompt_limit(dataclasses.replace(cfg, max_prompt_tokens=10), limits, rt) == 10
    assert capsys.readouterr().out == ""  # the policy's limit or max_prompt_tokens: nothing to say
    with pytest.raises(ConfigError, match=r"^generation.max_new_tokens: 30 leaves no room for a prompt in the 30 "
                                          r"tokens that services.reward.checkpoint takes; lower "
                                          "generation.max_new_tokens, or use a services.reward.checkpoint with a "
                                          "longer max_seq_len$"):
        prompt_limit(dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, max_new_tokens=30)),
                     limits, rt)
