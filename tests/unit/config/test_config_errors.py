"""Every invalid configuration gives one line naming the key and the fix."""

import pytest

from offline_rlhf.cli import main
from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig, ParallelConfig
from offline_rlhf.config.tools import SmokeConfig
from offline_rlhf.config.training import SFTConfig
from offline_rlhf.parallel.dims import ParallelDims

TINY = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=512)


@pytest.mark.parametrize("overrides,key,fragment", [
    (["model.hidden=3"], "model.hidden", "unknown key (not a field of ModelConfig)"),
    (["+foo=1"], "foo", "unknown key"),
    (["model=13b"], "model", "no config named 'model/13b'; available: 125m, 1b, 70b, 8b, demo, tiny"),
    (["model.dim=abc"], "model.dim", "could not be converted to Integer"),
    (["model.n_kv_heads=3"], "model.n_kv_heads", "3 does not divide model.n_heads=4"),
    (["parallel.dp_mode=zero3"], "parallel.dp_mode", "use 'fsdp' or 'ddp'"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel", "needs parallel.tp > 1"),
    (["seq_len=4096"], "seq_len", "exceeds model.max_seq_len=512"),
    # Values Hydra's grammar refuses unquoted: its reason and how to quote (was `config: None`).
    (["run_dir=a=b"], "run_dir",
     "cannot parse 'run_dir=a=b': mismatched input '=' expecting <EOF>; quote the value: run_dir='a=b'"),
    (["run_dir=runs#1"], "run_dir", "cannot parse 'run_dir=runs#1': a character Hydra's grammar does not take here"),
    (["seq_len=[a=b]"], "seq_len", "; quote each string in the value, e.g. seq_len=['a=b'] (in a shell"),
    (["a b=c"], "config", "cannot parse 'a b=c': a character Hydra's grammar does not take here; write it as key="),
    # A quoted argument split over lines in a shell (was: "quote each string in the value").
    (["run_dir=[a,\n b]"], "run_dir", "run_dir: the value holds a line break; write it on one line"),
])
def test_compose_errors_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        compose_stage("smoke", SmokeConfig, overrides)
    message = str(info.value)
    assert info.value.key == key and message.startswith(f"{key}: ") and fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("parallel,world_size,model,fragment", [
    (ParallelConfig(tp=3), 6, TINY,
     "parallel.tp: 3 does not divide model.n_heads=4; choose a parallel.tp that divides 4"),
    (ParallelConfig(tp=4), 4, TINY, "parallel.tp: 4 does not divide model.n_kv_heads=2"),
    (ParallelConfig(tp=2), 3, TINY, "parallel.tp: 2 does not divide the world size 3"),
    (ParallelConfig(tp=2, dp=2), 2, TINY, "parallel.dp: tp=2 x dp=2 = 4 but the world size is 2; set parallel.dp=1"),
    (ParallelConfig(tp=2, dp_mode="ddp"), 2, TINY, "parallel.dp_mode: ddp cannot be combined with tensor parallelism"),
])
def test_parallel_dims_errors(parallel, world_size, model, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        ParallelDims.build(parallel, world_size, model)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_dp_fills_the_world():
    dims = ParallelDims.build(ParallelConfig(tp=2), 8, TINY)
    assert (dims.dp, dims.tp, dims.world_size) == (4, 2, 8)


def test_cli_prints_one_line_and_exits_2(capsys):
    assert main(["smoke", "model.hidden=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("orlhf smoke: error: model.hidden: unknown key (not a field of ModelConfig); "
                   "check the spelling; `--cfg` prints the valid keys")


@pytest.mark.parametrize("stage,overrides,message", [
    ("label", ["rm=/r", "inputs=[{name: a, kind: generated, path: /a}, {name: b, kind: generated, path: /b, "
               "max_sample: 5}]"],
     "inputs[1].max_sample: unknown key (not a field of LabelInputConfig); did you mean inputs[1].max_samples?"),
    ("sft", ["data.sources=[{name: d, format: jsonl, path: /d, wieght: 2}]"],
     "data.sources[0].wieght: unknown key (not a field of SourceConfig); did you mean data.sources[0].weight?"),
    ("sft", ["data.sources=[{name: d, format: jsonl, path: /d, zzz: 2}]"],
     "data.sources[0].zzz: unknown key (not a field of SourceConfig); check the spelling;"),
])
def test_a_misspelt_key_of_a_list_item_names_its_position_and_the_field_meant(capsys, stage, overrides, message):
    """omegaconf names the item's key alone (`max_sample`): in a list of sources that
    does not say which item, and no field of the stage matched it to suggest."""
    assert main([stage, *overrides]) == 2
    assert capsys.readouterr().err.strip() == f"orlhf {stage}: error: {message} `--cfg` prints the valid keys"


def test_cli_cfg_prints_resolved_config(capsys):
    assert main(["smoke", "model=8b", "parallel=tp4_sp", "seq_len=128", "--cfg"]) == 0
    out = capsys.readouterr().out
    assert "vocab_size: 256000" in out and "tp: 4" in out and "sequence_parallel: true" in out


def test_unknown_stage(capsys):
    assert main(["sfft"]) == 2
    assert "unknown stage 'sfft'" in capsys.readouterr().err


def test_paper_8b_attributes():
    from offline_rlhf.config.compose import compose_stage as compose
    model = compose("smoke", SmokeConfig, ["model=8b", "seq_len=64"]).model
    assert (model.max_seq_len, model.qkv_bias, model.tie_embeddings) == (4096, False, False)
    assert 8.0e9 < model.num_params() < 9.0e9


def test_config_formats_name_the_data_readers():
    from offline_rlhf.config.schema import PREFERENCE_FORMATS, SFT_FORMATS
    from offline_rlhf.data.preference_readers import PREFERENCE_READERS
    from offline_rlhf.data.sft_readers import READERS

    assert set(SFT_FORMATS) == set(READERS) and set(PREFERENCE_FORMATS) == set(PREFERENCE_READERS)


@pytest.mark.parametrize("stage,override,fragment", [
    ("sft", "data.sources.0.format=csv", "data.sources[oasst1].format: unknown format 'csv'"),
    ("sft", "data.sources.0.format=hh_rlhf", "'hh_rlhf' is not a supervised (prompt, response) format"),
    ("rm", "data.sources.0.format=dolly", "'dolly' is not a preference (prompt, chosen, rejected) format"),
    ("sft", "data.max_seq_len=1", "data.max_seq_len: must be at least 2"),
])
def test_data_source_errors(stage, override, fragment, capsys):
    assert main([stage, override]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("key,value,allowed", [
    ("compile_mode", "max-autotune", "default, coordinate-descent, max-autotune-no-cudagraphs"),
    ("decode_attention", "paged", "sdpa, flex")])
def test_generation_decode_settings_take_known_values(key, value, allowed):
    from offline_rlhf.config.schema import GenerationConfig

    with pytest.raises(ConfigError) as info:
        GenerationConfig(**{key: value})
    assert info.value.key == f"generation.{key}" and str(info.value).endswith(f"use one of {allowed}")


@pytest.mark.parametrize("override,key,fragment", [
    ("train.keep_last=-1", "train.keep_last", "must be >= 0, got -1"),  # it deleted the final checkpoint
    ("train.val_every=-5", "train.val_every", "must be >= 0"),
    ("train.max_steps=0", "train.max_steps", "must be positive (or -1: as many as train.epochs gives)"),
    ("train.epochs=0", "train.epochs", "must be positive"),
])
def test_training_loop_settings_are_checked(override, key, fragment):
    from offline_rlhf.config.training import SFTConfig

    with pytest.raises(ConfigError) as info:
        compose_stage("sft", SFTConfig, [override])
    assert info.value.key == key and fragment in str(info.value)


@pytest.mark.parametrize("override", ["model.rope_scaling={factor: 8.0}", "model.rope_scaling.factor=8.0"])
def test_setting_a_null_sub_config_on_the_command_line_is_one_line_saying_where_to_set_it(override):
    """Was: omegaconf's AttributeError / AssertionError traceback."""
    with pytest.raises(ConfigError, match=r"^overrides: an override of a sub-config that is null by default \(such "
                                          r"as model.rope_scaling\) cannot be applied from the command line; set it "
                                          r"in a YAML file of its group"):
        compose_stage("sft", SFTConfig, [override])
