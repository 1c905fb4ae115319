"""Hugging Face import/export: config mapping, logit parity with transformers, exact round
trips, and errors that name the file and key. Tiny random models keep it fast."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from offline_rlhf.checkpoint import (
    TEMPLATE,
    CheckpointMeta,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import RopeScalingConfig
from offline_rlhf.config.tools import ConvertConfig
from offline_rlhf.models.hf import HFFormatError, HFWeights, config_from_hf, config_to_hf, hf_name, write_hf_weights
from offline_rlhf.stages.convert import empty_model, main

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
VARIANTS = {
    "llama_gqa_llama3_rope": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=50000.0)),
    "llama_mha_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral_head_dim": ("mistral", dict(head_dim=8, sliding_window=None)),
    "qwen2_bias": ("qwen2", dict()),
    # transformers applies the window from layer max_window_layers on: here to none.
    "qwen2_window_in_no_layer": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    # q/k norms, and heads wider than hidden_size / heads (as Qwen3-0.6B's 16 x 128 over 1024)
    "qwen3_qk_norm_wide_heads": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),
}


def tiny_hf_model(model_type: str, task: str = "CausalLM", **overrides):
    """A random transformers model; biases (qwen2) and norm weights made nonzero/non-one so
    they are tested. Overrides are deep-copied: transformers edits rope dicts in place."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **copy.deepcopy({**TINY, **overrides}), num_labels=1)
    auto = getattr(transformers, f"AutoModelFor{task}")
    model = auto.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                param.normal_(0, 0.5)
    return model


def fixed_batch(vocab_size: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(1, vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


def import_dir(hf_dir, out, head="lm"):
    """Run `orlhf convert import_hf` in process; return our model loaded from its checkpoint."""
    assert main(ConvertConfig(action="import_hf", hf_dir=str(hf_dir), out=str(out), head=head)) == 0
    return load_ours(out)


def load_ours(ckpt_root):
    path = latest_checkpoint(ckpt_root)
    meta = read_meta(path)
    model = empty_model(meta.model, meta.head)
    load_checkpoint(path, model)
    return model.eval()


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["single", "sharded"])
def test_import_matches_transformers_logits(tmp_path, variant, max_shard_size):
    model_type, overrides = VARIANTS[variant]
    hf_model = tiny_hf_model(model_type, **overrides)
    hf_model.save_pretrained(tmp_path / "hf", **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == bool(max_shard_size)

    ours = import_dir(tmp_path / "hf", tmp_path / "ckpt")

    tokens = fixed_batch()
    with torch.no_grad():
        expected = hf_model(tokens).logits
        actual = ours(tokens)
    assert (actual - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_value_head_import_matches_sequence_classification(tmp_path, model_type):
    hf_model = tiny_hf_model(model_type, task="SequenceClassification")
    hf_model.save_pretrained(tmp_path / "hf")
    ours = import_dir(tmp_path / "hf", tmp_path / "ckpt", head="value")
    tokens = fixed_batch()
    with torch.no_grad():
        assert (ours(tokens)[:, -1] - hf_model(tokens).logits[:, 0]).abs().max().item() <= 1e-5


def test_tied_weights_stay_tied_after_import(tmp_path):
    tiny_hf_model("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "hf")
    ours = import_dir(tmp_path / "hf", tmp_path / "ckpt")
    assert ours.output.weight is ours.tok_embeddings.weight


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("variant", ["llama_mha_tied", "qwen2_bias", "qwen3_qk_norm_wide_heads"])
def test_export_then_import_is_bitwise_exact(tmp_path, variant):
    model_type, overrides = VARIANTS[variant]
    tiny_hf_model(model_type, **overrides).save_pretrained(tmp_path / "hf")
    first = import_dir(tmp_path / "hf", tmp_path / "ckpt1")
    assert main(ConvertConfig(action="export_hf", ckpt=str(tmp_path / "ckpt1"), out=str(tmp_path / "out"))) == 0
    second = import_dir(tmp_path / "out", tmp_path / "ckpt2")
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for name, tensor in first_state.items():
        assert torch.equal(tensor, second_state[name]), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_loads_in_transformers_with_same_logits(tmp_path, variant):
    """Checks config_to_hf too: rope scaling, head_dim, tying and biases must survive."""
    model_type, overrides = VARIANTS[variant]
    hf_model = tiny_hf_model(model_type, **overrides)
    hf_model.save_pretrained(tmp_path / "hf")
    import_dir(tmp_path / "hf", tmp_path / "ckpt")
    main(ConvertConfig(action="export_hf", ckpt=str(tmp_path / "ckpt"), out=str(tmp_path / "out")))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = fixed_batch()
    with torch.no_grad():
        assert (reloaded(tokens).logits - hf_model(tokens).logits).abs().max().item() <= 1e-5


QWEN_WINDOW = dict(sliding_window=8, use_sliding_window=True, max_window_layers=1)


@pytest.mark.parametrize("model_type, window", [("mistral", dict(sliding_window=8)), ("qwen2", QWEN_WINDOW),
                                               ("qwen3", QWEN_WINDOW)], ids=["mistral", "qwen2", "qwen3"])
def test_sliding_window_export_reproduces_the_source_past_the_window(tmp_path, model_type, window):
    """The import is capped to the window (where windowed attention is full attention);
    the export restores the window, so transformers matches the source at any length."""
    hf_model = tiny_hf_model(model_type, **window)
    hf_model.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="sliding_window=8"):
        ours = import_dir(tmp_path / "hf", tmp_path / "ckpt")
    assert ours.cfg.max_seq_len == 8
    main(ConvertConfig(action="export_hf", ckpt=str(tmp_path / "ckpt"), out=str(tmp_path / "out")))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(hf_model)
    tokens = fixed_batch()  # 24 tokens: 3 windows
    with torch.no_grad():
        assert (reloaded(tokens).logits - hf_model(tokens).logits).abs().max().item() <= 1e-5
        assert (ours(tokens[:, :8]) - hf_model(tokens[:, :8]).logits).abs().max().item() <= 1e-5


def test_export_dtype_and_tied_weights_left_out(tmp_path):
    tiny_hf_model("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "hf")
    import_dir(tmp_path / "hf", tmp_path / "ckpt")
    main(ConvertConfig(action="export_hf", ckpt=str(tmp_path / "ckpt"), out=str(tmp_path / "out"), dtype="bfloat16"))
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in tensors
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True


def test_export_refuses_wrong_head_and_non_empty_out(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "hf")
    import_dir(tmp_path / "hf", tmp_path / "ckpt")
    step_dir = latest_checkpoint(tmp_path / "ckpt")  # a step directory is accepted as well as the root
    with pytest.raises(ConfigError, match="head: .* holds a 'lm' head, not 'value'; pass head=lm"):
        main(ConvertConfig(action="export_hf", ckpt=str(step_dir), out=str(tmp_path / "out"), head="value"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").touch()
    with pytest.raises(ConfigError, match="out: .* exists and is not empty"):
        main(ConvertConfig(action="export_hf", ckpt=str(step_dir), out=str(tmp_path / "out")))


def test_import_refuses_a_non_empty_out(tmp_path):
    """Importing into a checkpoint root would repoint its `latest` at the import."""
    tiny_hf_model("llama").save_pretrained(tmp_path / "hf")
    import_dir(tmp_path / "hf", tmp_path / "ckpt")
    before = latest_checkpoint(tmp_path / "ckpt")
    tiny_hf_model("qwen2").save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"out: .*ckpt exists and is not empty; choose an empty folder or delete"):
        main(ConvertConfig(action="import_hf", hf_dir=str(tmp_path / "other"), out=str(tmp_path / "ckpt")))
    assert latest_checkpoint(tmp_path / "ckpt") == before
    assert not read_meta(before).model.qkv_bias  # still the llama


def test_chat_export_generation_config_stops_where_config_json_does(tmp_path):
    """transformers' generate reads generation_config.json first: it must list the
    end-of-turn token a chat-trained model ends its replies with, as config.json does,
    besides the stops the imported model's file listed."""
    from tests.fixtures import reference_model
    from tests.synthetic_preferences import MODEL
    from tests.unit.data.test_chat_template import CHATML
    from tests.unit.stages.test_export_template import chat_tokenizer

    folder = tmp_path / "tokenizer"
    tokenizer = chat_tokenizer(tmp_path, folder, CHATML)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_id, 4],
                                                               "temperature": 0.6, "do_sample": True}))
    meta = CheckpointMeta(MODEL, "lm", TrainState(step=1), metadata={TEMPLATE: {"kind": "chat", "system": ""}})
    save_checkpoint(tmp_path / "ckpt", reference_model(MODEL, "lm"), meta, tokenizer_dir=folder)
    main(ConvertConfig(action="export_hf", ckpt=str(tmp_path / "ckpt"), out=str(tmp_path / "out")))
    stops = [tokenizer.eos_id, 4, tokenizer.backend.token_to_id("<|im_end|>")]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == stops
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert generation.eos_token_id == stops and generation.pad_token_id == tokenizer.pad_id
    assert (generation.temperature, generation.do_sample) == (0.6, True)


# ---------------------------------------------------------------------------- pieces


def test_hf_names():
    assert hf_name("tok_embeddings.weight") == "model.embed_tokens.weight"
    assert hf_name("layers.11.attention.wk.bias") == "model.layers.11.self_attn.k_proj.bias"
    assert hf_name("layers.0.feed_forward.w1.weight") == "model.layers.0.mlp.gate_proj.weight"
    assert hf_name("layers.0.feed_forward.w3.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_name("layers.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("score.weight") == "score.weight"


def test_config_reads_legacy_and_new_rope_keys():
    """transformers 4.x: top-level rope_theta + rope_scaling (older still: `type`); 5.x: rope_parameters."""
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    legacy = {"model_type": "llama", **TINY, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}}
    new = {"model_type": "llama", **TINY, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}}
    expected = RopeScalingConfig(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=32)
    for hf_config in (legacy, new):
        cfg = config_from_hf(hf_config)
        assert (cfg.rope_theta, cfg.rope_scaling) == (5e5, expected)


def test_config_round_trips_through_hf_dict():
    cfg = config_from_hf({"model_type": "qwen2", **TINY, "tie_word_embeddings": True,
                          "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 1e6}})
    hf_config = config_to_hf(cfg, "lm")
    assert hf_config["architectures"] == ["Qwen2ForCausalLM"]
    again = config_from_hf(hf_config)
    assert again == cfg


def test_qwen3_configs_round_trip_and_biases_with_norms_are_refused():
    cfg = config_from_hf({"model_type": "qwen3", **TINY, "head_dim": 32})
    assert (cfg.qk_norm, cfg.qkv_bias, cfg.head_dim) == (True, False, 32)
    hf_config = config_to_hf(cfg, "lm")
    assert hf_config["architectures"] == ["Qwen3ForCausalLM"] and config_from_hf(hf_config) == cfg
    with pytest.raises(ConfigError, match="q/k/v biases with normalized queries and keys match no Hugging Face"):
        config_to_hf(replace(cfg, qkv_bias=True), "lm")


def test_value_head_config_needs_pad_token():
    cfg = config_from_hf({"model_type": "llama", **TINY})
    with pytest.raises(ConfigError, match="pad_token_id"):
        config_to_hf(cfg, "value")
    hf_config = config_to_hf(cfg, "value", extra={"pad_token_id": 0})
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"] and hf_config["num_labels"] == 1
    for eos in (2, [2, 5]):  # a list: EOS, then the other stops (generation_config.json's, end of turn)
        with pytest.warns(UserWarning, match="pad_token_id == eos_token_id"):
            config_to_hf(cfg, "value", extra={"pad_token_id": 2, "eos_token_id": eos})


def test_sliding_window_caps_max_seq_len():
    hf_config = {"model_type": "mistral", **TINY, "sliding_window": 64}
    with pytest.warns(UserWarning, match="sliding_window=64"):
        assert config_from_hf(hf_config).max_seq_len == 64
    qwen = {"model_type": "qwen2", **TINY, "sliding_window": 64, "use_sliding_window": False}
    assert config_from_hf(qwen).max_seq_len == TINY["max_position_embeddings"]


def test_qwen2_window_caps_only_when_some_layer_uses_it():
    """transformers' Qwen2: layers from max_window_layers on (default 28), or those that
    layer_types names, attend within the window; the others attend to everything."""
    qwen = {"model_type": "qwen2", **TINY, "sliding_window": 64, "use_sliding_window": True}
    uncapped = [{**qwen, "max_window_layers": 2}, qwen, {**qwen, "layer_types": ["full_attention"] * 2}]
    for hf_config in uncapped:
        assert config_from_hf(hf_config).max_seq_len == TINY["max_position_embeddings"]
    capped = [{**qwen, "max_window_layers": 1}, {**qwen, "layer_types": ["full_attention", "sliding_attention"]}]
    for hf_config in capped:
        with pytest.warns(UserWarning, match="sliding_window=64"):
            assert config_from_hf(hf_config).max_seq_len == 64


def test_shards_split_by_size_with_index(tmp_path):
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    files = write_hf_weights(tensors, tmp_path / "sharded", max_shard_bytes=100)
    assert [f.name for f in files] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    weights = HFWeights(tmp_path / "sharded")
    assert weights.names() == set(tensors)
    assert all(torch.equal(weights.get(name), tensor) for name, tensor in tensors.items())
    assert [f.name for f in write_hf_weights(tensors, tmp_path / "single")] == ["model.safetensors"]


# ---------------------------------------------------------------------------- errors


def test_unknown_model_type_names_file_and_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **TINY}))
    with pytest.raises(ConfigError, match=r"config\.json: model_type: unsupported 'gpt2'"):
        main(ConvertConfig(action="import_hf", hf_dir=str(tmp_path), out=str(tmp_path / "out")))


@pytest.mark.parametrize("rope_key", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_type_names_file_and_key(rope_key):
    hf_config = {"model_type": "llama", **TINY, rope_key: {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ConfigError, match=rf"my/config\.json: {rope_key}\.rope_type: 'yarn' is not supported"):
        config_from_hf(hf_config, source="my/config.json")


def test_missing_tensor_names_file_and_tensor(tmp_path):
    hf_dir = tmp_path / "hf"
    tiny_hf_model("llama").save_pretrained(hf_dir)
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match=r"model\.safetensors: no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        main(ConvertConfig(action="import_hf", hf_dir=str(hf_dir), out=str(tmp_path / "out")))


def test_missing_shard_is_one_line_naming_it(tmp_path):
    hf_dir = tmp_path / "hf"
    tiny_hf_model("llama").save_pretrained(hf_dir, max_shard_size="20KB")
    shards = sorted(hf_dir.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(HFFormatError, match=rf"index\.json: 1 shard\(s\) it lists are missing: {shards[1].name}; "
                                            "download the checkpoint again"):
        HFWeights(hf_dir)


def test_pickled_weights_are_refused_with_how_to_convert_them(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ConfigError, match=r"only pickled weights \(pytorch_model\.bin\): .*; convert them to "
                                          "safetensors first"):
        HFWeights(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors or model.safetensors.index.json"):
        HFWeights(tmp_path)


def test_unexpected_tensor_is_an_error(tmp_path):
    hf_dir = tmp_path / "hf"
    tiny_hf_model("llama").save_pretrained(hf_dir)
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(TINY["hidden_size"])
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    expected = r"model\.safetensors: 1 unexpected tensor\(s\), first \['model\.layers\.0\.self_attn\.o_proj\.bias'\]"
    with pytest.raises(HFFormatError, match=expected):
        main(ConvertConfig(action="import_hf", hf_dir=str(hf_dir), out=str(tmp_path / "out")))


def test_a_bf16_model_imports_in_bf16_and_loads_exactly_and_mixed_dtypes_import_in_fp32(tmp_path):
    """The import holds one copy of the model in its own dtype (an fp32 one would be twice
    a bf16 model's size: 280 GB for 70B); a stage loading it in fp32 gets the same values."""
    from torch.distributed.checkpoint import FileSystemReader

    tiny_hf_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    source = load_file(tmp_path / "hf" / "model.safetensors")
    assert HFWeights(tmp_path / "hf").dtype() == torch.bfloat16
    ours = import_dir(tmp_path / "hf", tmp_path / "ckpt")  # loaded into fp32 parameters
    stored = FileSystemReader(latest_checkpoint(tmp_path / "ckpt")).read_metadata().state_dict_metadata
    for name, param in ours.named_parameters():
        assert stored[f"model.{name}"].properties.dtype == torch.bfloat16, name
        assert param.dtype == torch.float32 and torch.equal(param, source[hf_name(name)].float()), name
    mixed = {**source, "model.norm.weight": source["model.norm.weight"].float()}
    save_file(mixed, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    assert HFWeights(tmp_path / "hf").dtype() == torch.float32


def test_a_bf16_export_holds_the_model_in_bf16_only(tmp_path, monkeypatch):
    """Loaded in fp32 and cast tensor by tensor, a bf16 export held the fp32 model and a
    whole bf16 copy (1.5x the fp32 model: 49 GB for 8B); it now loads in bf16, same bytes."""
    from offline_rlhf.stages import convert

    tiny_hf_model("llama").save_pretrained(tmp_path / "hf")
    import_dir(tmp_path / "hf", tmp_path / "ckpt")
    built = []
    monkeypatch.setattr(convert, "empty_model", lambda *args: built.append(empty_model(*args)) or built[-1])
    main(ConvertConfig(action="export_hf", ckpt=str(tmp_path / "ckpt"), out=str(tmp_path / "out"), dtype="bfloat16"))
    assert [{p.dtype for p in model.parameters()} for model in built] == [{torch.bfloat16}]
    exported, fp32 = load_file(tmp_path / "out" / "model.safetensors"), load_ours(tmp_path / "ckpt")
    for name, param in fp32.named_parameters():
        assert torch.equal(exported[hf_name(name)], param.detach().to(torch.bfloat16)), name
