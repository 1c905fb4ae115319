"""Hugging Face interchange: `config.json`, safetensors weights and tokenizer files.

Our decoder uses HF's weight layout and rotate-half RoPE, so conversion is a renaming of
tensors (no q/k permutation). One table (`hf_name`) maps our parameter names to HF's;
import and export both walk the model's own parameters through it, so the two directions
cannot drift apart. Supported families: llama, mistral, qwen2, qwen3.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig, RopeScalingConfig
from offline_rlhf.hub import TOKENIZER_FILES
from offline_rlhf.models.llama import Transformer

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # as headers name them
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_QWEN_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config and Qwen3Config default

# Our name -> HF name, for the parts inside `layers.{i}.` / `model.layers.{i}.`.
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Our name -> HF name, outside the layers. `score` is LlamaForSequenceClassification's head.
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head", "score": "score"}
# HF llama3 rope key -> RopeScalingConfig field.
_LLAMA3_ROPE_KEYS = {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
                     "original_max_position_embeddings": "original_max_position"}
# Buffers some older HF checkpoints saved; we recompute them, so they are not weights to import.
_DERIVED_HF_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq")


class HFFormatError(ConfigError):
    """A Hugging Face directory does not match what its config describes (a tensor missing,
    unexpected or misshapen). A ConfigError so `orlhf` reports it as one actionable line."""


def hf_name(name: str) -> str:
    """Our parameter name -> HF's, e.g. `layers.0.attention.wq.bias` ->
    `model.layers.0.self_attn.q_proj.bias`."""
    module, _, kind = name.rpartition(".")
    layer = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    if layer:
        return f"model.layers.{layer[1]}.{_LAYER_NAMES[layer[2]]}.{kind}"
    return f"{_TOP_NAMES[module]}.{kind}"


# ---------------------------------------------------------------------------- config


def read_hf_config(hf_dir: str | Path) -> ModelConfig:
    return config_from_hf(_read_config_json(hf_dir), source=str(Path(hf_dir) / CONFIG_FILE))


def hf_head(hf_dir: str | Path) -> str:
    """`value` for a `*ForSequenceClassification` checkpoint (a reward model), else `lm`."""
    architectures = _read_config_json(hf_dir).get("architectures") or []
    return "value" if any(name.endswith("ForSequenceClassification") for name in architectures) else "lm"


def _read_config_json(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError("hf_dir", f"{path} not found",
                          "point hf_dir at a Hugging Face model directory or hub repo id (org/name)")
    return json.loads(path.read_text())


def config_from_hf(hf_config: dict, source: str = CONFIG_FILE) -> ModelConfig:
    """A llama/mistral/qwen2/qwen3 `config.json` (as a dict) -> ModelConfig. `source` names the file
    in error messages. Features we do not implement are errors, never silently dropped."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: model_type", f"unsupported {model_type!r}",
                          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    _check_unsupported_features(hf_config, source)

    def required(key: str):
        if hf_config.get(key) is None:
            raise ConfigError(f"{source}: {key}", "missing", "a complete HF config.json has it")
        return hf_config[key]

    rope_theta, rope_scaling = _rope_from_hf(hf_config, source)
    window, window_layers_from = _applied_sliding_window(hf_config) or (None, 0)
    return ModelConfig(
        name=hf_config.get("_name_or_path") or model_type,
        vocab_size=required("vocab_size"),
        dim=required("hidden_size"),
        n_layers=required("num_hidden_layers"),
        n_heads=required("num_attention_heads"),
        n_kv_heads=hf_config.get("num_key_value_heads"),
        head_dim=_explicit_head_dim(hf_config),
        ffn_dim=required("intermediate_size"),
        norm_eps=required("rms_norm_eps"),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_seq_len=_max_seq_len(window, source, required("max_position_embeddings")),
        # Qwen2 always has q/k/v biases (Qwen3's attention_bias, with an o_proj bias, and
        # Llama's are rejected above); Qwen3 always normalizes queries and keys.
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        init_std=hf_config.get("initializer_range", 0.02),
        sliding_window=window,
        window_layers_from=window_layers_from,
    )


def _check_unsupported_features(hf_config: dict, source: str) -> None:
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act", f"{act!r} is not supported", "only SwiGLU (silu) is implemented")
    # Llama's attention_bias also puts a bias on o_proj, which our decoder does not have.
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            raise ConfigError(f"{source}: {key}", "true is not supported",
                              "only q/k/v biases (as in qwen2) are implemented")


def _explicit_head_dim(hf_config: dict) -> int | None:
    """None when head_dim is the default hidden_size // heads, so configs compare equal
    whether or not the HF file spelled it out (transformers 5 always does)."""
    head_dim = hf_config.get("head_dim")
    return None if head_dim == hf_config["hidden_size"] // hf_config["num_attention_heads"] else head_dim


def _rope_from_hf(hf_config: dict, source: str) -> tuple[float, RopeScalingConfig | None]:
    """transformers<5 writes `rope_theta` + `rope_scaling`; 5.x writes `rope_parameters`
    (theta included). Both are read; the newer key wins."""
    rope = {**(hf_config.get("rope_scaling") or {}), **(hf_config.get("rope_parameters") or {})}
    rope_key = "rope_parameters" if hf_config.get("rope_parameters") else "rope_scaling"
    theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"{source}: {rope_key}.rope_type", f"{rope_type!r} is not supported",
                          "only 'default' and 'llama3' RoPE are implemented")
    missing = [key for key in _LLAMA3_ROPE_KEYS if key not in rope]
    if missing:
        raise ConfigError(f"{source}: {rope_key}", f"llama3 RoPE without {missing}")
    return theta, RopeScalingConfig(**{ours: rope[theirs] for theirs, ours in _LLAMA3_ROPE_KEYS.items()})


def _max_seq_len(window: int | None, source: str, max_positions: int) -> int:
    """Sliding-window attention is not implemented. Up to the window's length it equals full
    causal attention, so a model with a smaller window is capped to it (with a warning)."""
    if window is None or window >= max_positions:
        return max_positions
    warnings.warn(f"{source}: sliding_window={window} < max_position_embeddings={max_positions}; "
                  f"sliding-window attention is not implemented, so max_seq_len is capped to {window}")
    return window


def _applied_sliding_window(hf_config: dict) -> tuple[int, int] | None:
    """(window, first layer using it) as transformers applies it, else None. Mistral: every
    layer. Qwen2 and Qwen3: with use_sliding_window, the layers that `layer_types`
    (transformers 5) names "sliding_attention", else those from `max_window_layers` on, so
    none when it is >= num_hidden_layers. (They make them the last layers; the export
    assumes so.)"""
    window = hf_config.get("sliding_window")
    if window is None or hf_config["model_type"] not in ("mistral", "qwen2", "qwen3"):
        return None
    if hf_config["model_type"] == "mistral":
        return window, 0
    if not hf_config.get("use_sliding_window", False):
        return None
    first = hf_config.get("max_window_layers", _QWEN_MAX_WINDOW_LAYERS)
    layer_types = hf_config.get("layer_types") or \
        ["sliding_attention" if i >= first else "full_attention" for i in range(hf_config["num_hidden_layers"])]
    windowed = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    return (window, windowed[0]) if windowed else None


def config_to_hf(cfg: ModelConfig, head: str = "lm", dtype: str = "float32", extra: dict | None = None,
                 scored_before_eos: bool = False) -> dict:
    """ModelConfig -> a `config.json` dict that transformers loads. Qwen2 when there are q/k/v
    biases (Llama's attention_bias would add an o_proj bias too), Qwen3 when queries and
    keys are normalized (no family has both), Mistral for an imported
    model with a sliding window (it is restored, so transformers reproduces the source
    model past max_seq_len too), Llama otherwise. head=value
    is `*ForSequenceClassification` with one label; it needs `pad_token_id` in `extra`,
    since HF reads the score at the last non-pad token. `extra` (token ids...) is merged in.
    `scored_before_eos`: the model reads its score where HF does when pad == eos (an imported
    reward model that recorded so), so that case needs no warning."""
    extra = extra or {}
    if head == "value":
        _check_pad_token_for_scoring(extra, scored_before_eos)
    family = hf_family(cfg)
    task = "ForCausalLM" if head == "lm" else "ForSequenceClassification"
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **{theirs: getattr(cfg.rope_scaling, ours)
                                                  for theirs, ours in _LLAMA3_ROPE_KEYS.items()}}
    hf = {
        "architectures": [family + task],
        "model_type": family.lower(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # Legacy rope keys: transformers 4.x reads only these, 5.x converts them.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_bias": False,
        "torch_dtype": dtype,  # transformers 4.x name
        "dtype": dtype,  # transformers 5.x name
    }
    if cfg.sliding_window is not None:
        hf["sliding_window"] = cfg.sliding_window
        if family.startswith("Qwen"):
            hf.update(use_sliding_window=True, max_window_layers=cfg.window_layers_from)
    if head == "value":
        hf["num_labels"] = 1
    return {**hf, **extra}


def hf_family(cfg: ModelConfig) -> str:
    """The transformers family a model exports as (`config_to_hf`)."""
    if cfg.qkv_bias and cfg.qk_norm:
        raise ConfigError("model", "q/k/v biases with normalized queries and keys match no Hugging Face family "
                          "(Qwen2 has the biases, Qwen3 the norms)", "export a model with one of the two")
    if cfg.qkv_bias or cfg.qk_norm:
        return "Qwen3" if cfg.qk_norm else "Qwen2"
    return "Mistral" if cfg.sliding_window is not None else "Llama"


def _check_pad_token_for_scoring(token_ids: dict, scored_before_eos: bool) -> None:
    """HF sequence classifiers score the rightmost token that is not `pad_token_id`; our
    reward model scores the last real token, which is eos when pad == eos would skip it."""
    if token_ids.get("pad_token_id") is None:
        raise ConfigError("pad_token_id", "a value-head export needs the pad token id",
                          "export from a checkpoint with a tokenizer/ folder that defines a pad token")
    eos = token_ids.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos  # a list starts with the EOS
    if token_ids["pad_token_id"] == eos and not scored_before_eos:
        warnings.warn("pad_token_id == eos_token_id: transformers will score the token before a trailing eos, "
                      "not the eos our reward model scores; use a tokenizer with a distinct pad token")


# ---------------------------------------------------------------------------- weights


class HFWeights:
    """Read-only view of a HF directory's safetensors, single-file or sharded with an index.
    Tensors are read one at a time, so importing never holds two copies of the model."""

    def __init__(self, hf_dir: str | Path):
        hf_dir = Path(hf_dir)
        index, single = hf_dir / INDEX_FILE, hf_dir / SINGLE_WEIGHTS_FILE
        if index.is_file():
            self.source = index
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: hf_dir / shard for name, shard in weight_map.items()}
            _check_shards_present(index, set(self._file_of.values()))
        elif single.is_file():
            self.source = single
            with safe_open(single, framework="pt") as handle:
                self._file_of = {name: single for name in handle.keys()}
        else:
            _refuse_missing_safetensors(hf_dir)
        self._handles = {}

    def names(self) -> set[str]:
        return set(self._file_of)

    def dtype(self) -> torch.dtype:
        """The weights' dtype when they all share one of DTYPES, else fp32 (read from the
        files' headers: no weights are read)."""
        dtypes = {self._handle(path).get_slice(name).get_dtype() for name, path in self._file_of.items()}
        return SAFETENSORS_DTYPES.get(dtypes.pop(), torch.float32) if len(dtypes) == 1 else torch.float32

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise HFFormatError(str(self.source), f"no tensor {name!r}",
                                "the weights do not match config.json (wrong head or model type?)")
        return self._handle(self._file_of[name]).get_tensor(name)

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]


def _check_shards_present(index: Path, shards: set[Path]) -> None:
    """Before reading anything, so an incomplete download is one line, not a traceback mid-import."""
    missing = sorted(shard.name for shard in shards if not shard.is_file())
    if missing:
        raise HFFormatError(str(index), f"{len(missing)} shard(s) it lists are missing: {', '.join(missing)}",
                            "download the checkpoint again (an interrupted download leaves shards out)")


def _refuse_missing_safetensors(hf_dir: Path) -> None:
    """Pickled weights (`*.bin`) are never loaded: unpickling runs code. Say how to convert them."""
    pickled = sorted(path.name for path in hf_dir.glob("*.bin"))
    if pickled:
        raise ConfigError("hf_dir", f"{hf_dir} has only pickled weights ({', '.join(pickled)}): only safetensors "
                          "checkpoints are supported (unpickling can run code)",
                          "convert them to safetensors first, in a trusted environment: load the model with "
                          "transformers' from_pretrained, then save_pretrained(NEW_DIR) writes safetensors")
    raise ConfigError("hf_dir", f"no {SINGLE_WEIGHTS_FILE} or {INDEX_FILE} in {hf_dir}",
                      "only safetensors checkpoints are supported")


def load_hf_weights(model: Transformer, weights: HFWeights) -> None:
    """Fill every parameter of `model` (single process) from `weights`, converting to the
    parameter's dtype. Strict: a missing, misshapen or unused tensor is an error naming it.
    A tied output weight is `tok_embeddings.weight`, which `named_parameters` lists once;
    a copy of it saved as `lm_head.weight` is tolerated."""
    used = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = hf_name(name)
            tensor = weights.get(key)
            if tensor.shape != param.shape:
                raise HFFormatError(str(weights.source), f"tensor {key!r} has shape {tuple(tensor.shape)}, "
                                    f"expected {tuple(param.shape)} for {name}", "check config.json")
            param.copy_(tensor)
            used.add(key)
    ignorable = {hf_name("output.weight")} if model.cfg.tie_embeddings else set()
    unused = sorted(n for n in weights.names() - used - ignorable if not _DERIVED_HF_TENSORS.fullmatch(n))
    if unused:
        raise HFFormatError(str(weights.source), f"{len(unused)} unexpected tensor(s), first {unused[:3]}",
                            "the weights do not match config.json or the requested head")


def hf_state_dict(model: Transformer, dtype: str) -> dict[str, torch.Tensor]:
    """The model's parameters under HF names, cast to `dtype` and contiguous (safetensors
    requires it). Tied output weights are left out, as HF expects with tie_word_embeddings."""
    cast = torch_dtype(dtype)
    return {hf_name(name): param.detach().to(cast).contiguous() for name, param in model.named_parameters()}


def write_hf_weights(tensors: dict[str, torch.Tensor], out_dir: str | Path,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """`model.safetensors` when everything fits in one shard, else
    `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _split_into_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_WEIGHTS_FILE]
    else:
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, out_dir / name, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                 "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / name for name in names]


def _split_into_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, in order; a tensor larger than the limit gets a shard of its own."""
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        if shards[-1] and size + _nbytes(tensor) > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name] = tensor
        size += _nbytes(tensor)
    return shards


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown {dtype!r}", f"use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------- tokenizer


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the tokenizer (and generation) files present in `src_dir`; returns their names."""
    present = [name for name in TOKENIZER_FILES if (Path(src_dir) / name).is_file()]
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    for name in present:
        shutil.copy2(Path(src_dir) / name, Path(dst_dir) / name)
    return present
