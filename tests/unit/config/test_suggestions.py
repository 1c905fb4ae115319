"""A misspelt or unqualified key, or a misspelt stage, gets the one it most likely meant."""

from __future__ import annotations

import pytest

from offline_rlhf.cli import main
from offline_rlhf.config.compose import closest_key, dotted_keys
from offline_rlhf.config.training import SFTConfig


@pytest.mark.parametrize("override,suggestion", [
    ("lr=1", "optim.lr"), ("optim.lrr=1", "optim.lr"), ("train.global_bach=2", "train.global_batch"),
    ("max_steps=3", "train.max_steps"),
])
def test_unknown_keys_suggest_the_closest_valid_one(override, suggestion, capsys):
    assert main(["sft", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"did you mean {suggestion}? `--cfg` prints the valid keys") and "\n" not in err


def test_no_suggestion_when_nothing_is_close(capsys):
    assert main(["sft", "colour=3"]) == 2
    assert "check the spelling; `--cfg` prints the valid keys" in capsys.readouterr().err


def test_keys_are_the_schema_fields_with_nested_configs_dotted():
    keys = dotted_keys(SFTConfig)
    assert {"optim.lr", "data.max_seq_len", "model.rope_scaling", "run_dir"} <= set(keys)
    assert closest_key("seed", keys) == "train.seed" and closest_key("colour", keys) is None


def test_a_misspelt_stage_is_suggested(capsys):
    assert main(["stf"]) == 2
    assert "unknown stage 'stf'; did you mean 'sft'?" in capsys.readouterr().err
