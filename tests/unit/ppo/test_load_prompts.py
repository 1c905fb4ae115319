"""The PPO actor's prompts: a multi-turn prompt is encoded as its turns, as SFT rendered it."""

from __future__ import annotations

import dataclasses

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.schema import TemplateConfig
from offline_rlhf.data.chat_template import build_template
from offline_rlhf.data.sft_readers import read_sft_source
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_prompt
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from ppo_baseline.config import PPOConfig
from ppo_baseline.stage import load_prompts
from tests.fixtures import TINY
from tests.local_data import OASST_TREES, prompt_sources
from tests.unit.data.test_chat_template import CHATML


def test_multi_turn_prompts_are_encoded_with_their_turns(tmp_path):
    train_bpe_tokenizer([OASST_TREES], 400, tmp_path / "tok",
                        special_tokens=("<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"))
    tokenizer = Tokenizer.from_dir(tmp_path / "tok")
    tokenizer.config["chat_template"] = CHATML
    model_cfg = dataclasses.replace(TINY, max_seq_len=100_000)
    for kind in ("chat", "paper"):
        cfg = compose_stage("ppo", PPOConfig, [f"run_dir={tmp_path}", prompt_sources(), f"template.kind={kind}",
                                               "total_prompts=null", "max_prompt_tokens=50000"])
        template = build_template(TemplateConfig(kind=kind), tokenizer.config)
        encoded, ids = load_prompts(cfg, tokenizer, template, model_cfg)
        examples = read_sft_source("oasst", str(OASST_TREES), template=ChatTemplate())
        expected = [encode_prompt(tokenizer, template, e.prompt, turns=e.turns) for e in examples]
        assert sorted(ids) == list(range(len(examples))) and sorted(encoded) == sorted(expected)
        # The history as one user message: the paper's format renders it so, a chat template does not.
        folded = {tuple(encode_prompt(tokenizer, template, e.prompt)) for e in examples if e.turns}
        assert folded and (folded <= set(map(tuple, encoded))) == (kind == "paper")
