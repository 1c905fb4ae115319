"""Composed configs are frozen after validation; config facts about the data stay in sync."""

from __future__ import annotations

import dataclasses

import pytest

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.schema import SourceConfig
from offline_rlhf.config.tools import TASK_FLAWS, TASK_MAX_EVAL_PROMPTS, SmokeConfig
from offline_rlhf.config.training import SFTConfig


def test_a_composed_config_refuses_assignment_at_every_depth():
    config = compose_stage("smoke", SmokeConfig, ["seq_len=8"])
    for owner, key, value in ((config, "seq_len", 16), (config.model, "dim", 8), (config.parallel, "tp", 2)):
        with pytest.raises(dataclasses.FrozenInstanceError, match=f"cannot assign '{key}'"):
            setattr(owner, key, value)
    assert config.seq_len == 8


def test_configs_inside_lists_are_frozen_too():
    config = compose_stage("sft", SFTConfig, ["init.tokenizer=tok"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data.sources[0].path = "elsewhere.jsonl"


def test_configs_built_in_code_stay_mutable_until_frozen():
    source = SourceConfig(name="a", path="a.jsonl")
    source.path = "b.jsonl"  # tests and library callers build configs piece by piece
    assert dataclasses.replace(source, weight=2.0).path == "b.jsonl"


def test_the_embedded_task_facts_match_its_data():
    from offline_rlhf.data.embedded_task import FAMILIES, FLAWS, _holdout_cap

    # As many instructions as `split_instructions` can hold out at most.
    assert TASK_MAX_EVAL_PROMPTS == sum(_holdout_cap(family.pool()) for family in FAMILIES)
    assert FLAWS == TASK_FLAWS
