"""The pieces every stage config is built from: model, parallel layout, weights to start
from, optimizer, training loop, logging, data sources, chat template and generation.

Each stage config (training.py, samples.py, evaluation.py, tools.py) composes these;
Hydra merges YAML from `conf/` into them in struct mode, so an unknown key is an error.
Per-piece checks live in `__post_init__`; checks that need the world size live in
`ParallelDims`. No torch import: `orlhf STAGE --cfg` stays fast.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from offline_rlhf.config.base import (
    WEEK_S,
    Frozen,
    require_non_negative,
    require_positive,
    require_seed,
    require_total,
)
from offline_rlhf.config.errors import ConfigError


@dataclass
class RopeScalingConfig(Frozen):
    """Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        require_positive(self, "factor", "low_freq_factor", "original_max_position", prefix="model.rope_scaling.")
        if self.high_freq_factor <= self.low_freq_factor:  # the band between them is interpolated
            raise ConfigError("model.rope_scaling.high_freq_factor", f"must exceed model.rope_scaling.low_freq_factor="
                              f"{self.low_freq_factor}, got {self.high_freq_factor}")


@dataclass
class ModelConfig(Frozen):
    """A Llama-family decoder. Defaults are the paper's 8B attributes (SwiGLU, RoPE,
    max sequence 4096, no dropout, no biases, untied embeddings)."""

    name: str = "custom"  # a label for logs and reports (presets: conf/model/)
    vocab_size: int = 32000  # rows of the embedding (>= the tokenizer's vocabulary)
    dim: int = 4096  # hidden size
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # attention (query) heads
    n_kv_heads: Optional[int] = None  # None: multi-head attention (n_kv_heads == n_heads)
    head_dim: Optional[int] = None  # None: dim // n_heads
    ffn_dim: int = 11008  # SwiGLU hidden size
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: Optional[RopeScalingConfig] = None  # Llama-3 style long-context RoPE scaling; null: none
    max_seq_len: int = 4096  # longest sequence (positions) the model takes
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys before RoPE (Qwen3)
    tie_embeddings: bool = False  # the output head shares the embedding's weights
    init_std: float = 0.02  # standard deviation of the initial weights
    # Set by `orlhf convert import_hf` for a Mistral/Qwen2 model with sliding-window attention,
    # which is not implemented: max_seq_len is capped to the window (where it changes nothing)
    # and `orlhf convert export_hf` restores it, so transformers reproduces the source model.
    sliding_window: Optional[int] = None  # the source model's attention window; null: none
    window_layers_from: int = 0  # the first layer using sliding_window (Qwen2's max_window_layers); 0: all

    def __post_init__(self):
        require_positive(self, "vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len", "rope_theta",
                         "norm_eps", "init_std", prefix="model.")
        require_non_negative(self, "window_layers_from", prefix="model.")
        if self.n_kv_heads is not None and self.n_kv_heads < 1:
            raise ConfigError("model.n_kv_heads", f"must be >= 1, got {self.n_kv_heads}",
                              "null for as many as model.n_heads")
        if self.head_dim is not None and self.head_dim < 2:  # rotary embeddings rotate pairs of dimensions
            raise ConfigError("model.head_dim", f"must be >= 2, got {self.head_dim}",
                              "null for model.dim // model.n_heads")
        if self.sliding_window is not None and self.sliding_window < self.max_seq_len:
            raise ConfigError("model.sliding_window", f"{self.sliding_window} < model.max_seq_len={self.max_seq_len}",
                              "sliding-window attention is not implemented; set max_seq_len <= sliding_window")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(
                "model.n_kv_heads",
                f"{self.n_kv_heads} does not divide model.n_heads={self.n_heads}",
                "choose a divisor of n_heads (grouped-query attention)",
            )
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError("model.dim", f"{self.dim} is not divisible by model.n_heads={self.n_heads}",
                              "set model.head_dim explicitly")
        if self.resolved_head_dim % 2:
            raise ConfigError("model.head_dim", f"must be even for rotary embeddings, got {self.resolved_head_dim}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def num_params(self, head: str = "lm") -> int:
        """Parameter count, used for analytic FLOPs and reports."""
        hd = self.resolved_head_dim
        attn = self.dim * hd * (self.n_heads * 2 + self.kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim + (2 * hd if self.qk_norm else 0)
        embed = self.vocab_size * self.dim
        out = 0 if head == "lm" and self.tie_embeddings else (self.vocab_size if head == "lm" else 1) * self.dim
        return embed + self.n_layers * per_layer + self.dim + out


@dataclass
class ParallelConfig(Frozen):
    """How the world is split. `dp=-1` fills whatever the world size leaves after TP."""

    tp: int = 1  # tensor-parallel size (Megatron-style column/row splits)
    dp: int = -1  # data-parallel size; -1: the processes left after TP
    dp_mode: str = "fsdp"  # fsdp (FSDP2 fully_shard) or ddp
    sequence_parallel: bool = False  # shard activations along the sequence between TP regions (needs tp > 1)
    loss_parallel: bool = False  # cross-entropy on vocabulary-sharded logits (no all-gather of logits)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    compile: bool = False  # torch.compile each block (with tp > 1 for static shapes: once per sequence length, up to 8)
    # How long a collective waits for the slowest rank before the job fails (torch's defaults:
    # NCCL 10, gloo 30). Waits for a rank's long work (a replica's share of generation, the
    # PPO services) do not count against it: they have a group of their own (parallel/distributed.py).
    timeout_min: float = 30.0

    def __post_init__(self):
        if not 2 <= self.timeout_min <= WEEK_S // 60:  # idle serving ranks hear a keep-alive every minute
            raise ConfigError("parallel.timeout_min", f"must be between 2 and {WEEK_S // 60} (minutes, a week), got "
                              f"{self.timeout_min}", "a collective gets that long to wait for the slowest rank")
        if self.tp < 1:
            raise ConfigError("parallel.tp", f"must be >= 1, got {self.tp}")
        if self.dp == 0 or self.dp < -1:
            raise ConfigError("parallel.dp", f"must be >= 1 or -1 (fill the world), got {self.dp}")
        if self.dp_mode not in ("fsdp", "ddp"):
            raise ConfigError("parallel.dp_mode", f"unknown mode {self.dp_mode!r}", "use 'fsdp' or 'ddp'")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel", "needs parallel.tp > 1",
                              "set parallel.tp or turn sequence_parallel off")


TEMPLATE_KINDS = ("paper", "chat")
# What a chat template's renderer defines itself (ours, JinjaChat.render, and transformers'
# apply_chat_template): a template.kwargs variable of one of these names would fight it, and an
# export's default for it would never apply.
TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "tools", "documents", "bos_token", "eos_token",
                      "pad_token", "unk_token", "raise_exception", "strftime_now")
# Names Jinja reads as literals or an operator, its `render` takes itself, or its globals
# that templates call (Qwen3's namespace(), range()): no variable's.
JINJA_RESERVED = ("true", "false", "none", "True", "False", "None", "not", "self", "namespace", "range", "dict",
                  "lipsum", "cycler", "joiner")


@dataclass
class TemplateConfig(Frozen):
    """How a conversation becomes text: the paper's `User: {instruction} Assistant: {response}`
    (kind=paper) or the tokenizer's own chat template (kind=chat). Checkpoints record it."""

    # paper: the tags below; chat: the tokenizer's chat_template (Jinja, rendered as transformers does)
    kind: str = "paper"
    user_tag: str = "User:"  # kind=paper: the tag before each user turn
    assistant_tag: str = "Assistant:"  # kind=paper: the tag before each assistant turn
    sep: str = " "  # kind=paper: what separates tags and texts
    system: str = ""  # kind=chat: a system message opening every conversation (empty: none)
    # kind=chat: extra variables for the chat template, as apply_chat_template(..., **kwargs) passes
    # them (Qwen3: {enable_thinking: false}); JSON values
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in TEMPLATE_KINDS:
            raise ConfigError("template.kind", f"{self.kind!r} is not a template kind", f"use one of {TEMPLATE_KINDS}")
        if self.system and self.kind != "chat":
            raise ConfigError("template.system", "needs template.kind=chat (the paper's format has no system turn)")
        if self.kwargs and self.kind != "chat":
            raise ConfigError("template.kwargs", "needs template.kind=chat (the paper's format has no template "
                              "variables)")
        self.kwargs = template_kwargs(self.kwargs)


def template_kwargs(kwargs, key: str = "template.kwargs") -> dict:
    """template.kwargs (or what `key` names: a request's chat_template_kwargs) as plain JSON
    values (a DictConfig or ListConfig, as OmegaConf may hand them, becomes a dict or list),
    each name a Jinja variable the renderer does not set itself."""
    if not isinstance(kwargs, Mapping):
        raise ConfigError(key, f"must be a mapping of variable names to values, got {kwargs!r}",
                          "e.g. {enable_thinking: false}")
    for name in kwargs:
        if not (isinstance(name, str) and name.isidentifier()) or name in JINJA_RESERVED:
            raise ConfigError(f"{key}.{name}", "is not a name a Jinja template can read",
                              "use a template variable's name, e.g. enable_thinking")
        if name in TEMPLATE_VARIABLES:
            raise ConfigError(f"{key}.{name}", "is set by the renderer itself",
                              f"leave out {', '.join(TEMPLATE_VARIABLES)}")
    return {name: _json_value(f"{key}.{name}", value) for name, value in kwargs.items()}


def _json_value(key: str, value):
    """`value` as plain JSON (a dict, list, string, finite number, bool or null): what a
    checkpoint records, and a template sees as transformers would pass it."""
    if isinstance(value, Mapping):
        if not all(isinstance(name, str) for name in value):
            raise ConfigError(key, f"has a key that is not a string: {dict(value)!r}", "JSON keys are strings")
        return {name: _json_value(f"{key}.{name}", item) for name, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_json_value(f"{key}[{index}]", item) for index, item in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise ConfigError(key, f"is not a JSON value: {value!r}",
                      "use a string, a finite number, true/false, null, or lists and mappings of those")


# The reader names of offline_rlhf.data (SFT and preference families); a test keeps them in sync.
SFT_FORMATS = ("oasst", "dolly", "flan_cot", "self_instruct", "jsonl", "hf")
PREFERENCE_FORMATS = ("hh_rlhf", "oasst", "jsonl", "hf")
# How `format: hf` rows are parsed, per family (offline_rlhf.data.hub_datasets); `auto` picks from the columns.
HF_SFT_LAYOUTS = ("columns", "messages", "dolly", "oasst")
HF_PREFERENCE_LAYOUTS = ("columns", "messages", "hh_rlhf", "oasst")


def check_formats(sources, allowed: tuple[str, ...], family: str) -> None:
    for source in sources:
        if source.format not in allowed:
            raise ConfigError(f"data.sources[{source.name or source.path}].format",
                              f"{source.format!r} is not a {family} format", f"use one of {', '.join(allowed)}")


@dataclass
class DatasetInput(Frozen):
    """A file or dataset read with a `format` reader, its column names, and what only
    `format: hf` reads (through `datasets`, the `hub` extra): `path` is then a hub dataset
    id `org/name[@revision]` or a local dataset folder or parquet/JSON/JSONL/CSV file, and
    `layout` says how its rows read (auto: from the columns)."""

    name: str = ""  # names the input in counts and errors ("": its path)
    format: str = "jsonl"  # the reader: jsonl, hf, or a named format (oasst, dolly, hh_rlhf, ...)
    path: str = ""  # the file, folder or hub dataset id
    prompt_key: str = "prompt"  # jsonl/hf: the column (JSON key) of the prompt text
    response_key: str = "response"  # jsonl/hf, SFT: the column of the reply
    chosen_key: str = "chosen"  # jsonl/hf, preferences: the column of the preferred reply
    rejected_key: str = "rejected"  # jsonl/hf, preferences: the column of the other reply
    messages_key: str = "messages"  # hf, layout messages: the [{role, content}, ...] column
    split: str = "train"  # hf: the split to read (train, test, train_prefs, ...)
    subset: str = ""  # hf: the dataset's configuration name; "" for its default
    data_dir: str = ""  # hf: a folder inside the dataset (hh-rlhf's helpful-base, ...); "" for all
    layout: str = "auto"  # hf: auto, columns, messages, dolly, oasst (SFT) / hh_rlhf (preference)

    def check_layout(self, key: str) -> None:
        layouts = ("auto", *dict.fromkeys(HF_SFT_LAYOUTS + HF_PREFERENCE_LAYOUTS))
        if self.layout not in layouts:
            raise ConfigError(f"{key}.layout", f"unknown layout {self.layout!r}", f"use one of {', '.join(layouts)}")


def check_weight(key: str, weight: float) -> None:
    """A source's sampling weight in a mix (data.sources, sources): > 0."""
    if weight <= 0:
        raise ConfigError(f"{key}.weight", f"must be > 0, got {weight}",
                          "give it a positive share, or remove the source")


def check_unique_names(list_key: str, inputs, noun: str, fix: str) -> None:
    """Every input of `list_key` has its own name (its name, else its path): counts and
    records are keyed by it."""
    names = [item.name or item.path for item in inputs]
    if twice := next((name for name in names if names.count(name) > 1), None):
        raise ConfigError(f"{list_key}[{twice}].name", f"names two {noun}", fix)


@dataclass
class SourceConfig(DatasetInput):
    """One dataset in a mix. `format` names a reader (oasst, dolly, flan_cot, self_instruct,
    jsonl, hf for SFT; hh_rlhf, oasst, jsonl, hf for preferences)."""

    weight: float = 1.0  # sampling weight in the mix

    def __post_init__(self):
        if not self.path:
            raise ConfigError(f"data.sources[{self.name or '?'}].path", "is required",
                              "pass the file (or HF dataset name)")
        if self.format not in SFT_FORMATS + PREFERENCE_FORMATS:
            raise ConfigError(f"data.sources[{self.name or self.path}].format", f"unknown format {self.format!r}",
                              f"use one of {', '.join(sorted(set(SFT_FORMATS + PREFERENCE_FORMATS)))}")
        check_weight(f"data.sources[{self.name or self.path}]", self.weight)
        self.check_layout(f"data.sources[{self.name or self.path}]")


@dataclass
class SequenceDataConfig(Frozen):
    """What every training stage's data has: a length limit, a validation share and the
    chat template (SFT and preference sources, or the labeled alignment set)."""

    max_seq_len: int = 2048  # tokens per training sequence; longer samples are truncated (counted)
    val_fraction: float = 0.02  # share of the examples held out for validation
    template: TemplateConfig = field(default_factory=TemplateConfig)

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("data.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.max_seq_len < 2:
            raise ConfigError("data.max_seq_len", f"must be at least 2 (a prompt token and a response token), "
                              f"got {self.max_seq_len}")


@dataclass
class DataConfig(SequenceDataConfig):
    """SFT or preference sources, mixed by weight."""

    # datasets to read: name, format, path (file, folder or hub id), weight, ...
    sources: list[SourceConfig] = field(default_factory=list)
    total_samples: Optional[int] = None  # None: every example of every source once (weights then unused)
    pack: bool = True  # pack several samples into each sequence (document-masked attention)
    # Unusable records (identical replies, a blank response) are skipped and counted in the
    # dataset card; strict makes each one an error naming file:line, as malformed ones are.
    strict: bool = False
    dedupe: bool = False  # drop exact duplicates (same text) before mixing; counted either way

    def __post_init__(self):
        super().__post_init__()
        require_total(self, "total_samples", prefix="data.")

    def check_sources(self, formats: tuple[str, ...], family: str) -> None:
        """What a stage reading these sources needs of them (run by it: the default config
        nested here is built with no sources): some, of its formats, with distinct names."""
        if not self.sources:
            raise ConfigError("data.sources", "is empty", "list at least one source (see conf/data/)")
        check_formats(self.sources, formats, family)
        check_unique_names("data.sources", self.sources, "sources",
                           "give each source its own name (the key of its counts in the dataset card)")


@dataclass
class OptimConfig(Frozen):
    lr: float = 5e-6  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    schedule: str = "cosine"  # cosine (to min_lr_ratio * lr) or constant, both after linear warmup
    warmup_steps: int = 0  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine schedule's final lr as a fraction of lr
    grad_clip: float = 1.0  # global gradient-norm limit; <= 0 turns clipping off

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError("optim.schedule", f"unknown schedule {self.schedule!r}", "use cosine or constant")
        if self.lr <= 0:
            raise ConfigError("optim.lr", f"must be > 0, got {self.lr}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """What AdamW would refuse with a traceback, or accept and turn into NaN weights."""
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}", f"must be in [0, 1), got {getattr(self, key)}")
        if self.eps <= 0:  # 0 divides 0 by 0 for every parameter whose gradient is zero (unused token rows)
            raise ConfigError("optim.eps", f"must be > 0, got {self.eps}", "the usual value is 1e-8")
        if self.weight_decay < 0:
            raise ConfigError("optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")

    def warmup_note(self, steps: int, prefix: str = "") -> str | None:
        """A line for a run whose `steps` optimizer steps end inside the warmup (it trains below
        optim.lr throughout: fine for a test run of a few steps, a waste if a typo); None else."""
        if self.warmup_steps < steps:
            return None
        return (f"note: {prefix}optim.warmup_steps={self.warmup_steps} is not below the run's {steps} optimizer "
                f"steps: it trains below {prefix}optim.lr throughout")


@dataclass
class TrainConfig(Frozen):
    global_batch: int = 128  # samples (packed sequences, or preference pairs) per optimizer step
    micro_batch: int = 1  # per data-parallel rank per forward/backward
    epochs: float = 1.0  # passes over the training data (fractions allowed)
    max_steps: int = -1  # -1: as many as `epochs` gives
    val_every: int = 100  # steps; 0 disables periodic validation (it still runs at the end)
    val_batches: int = 0  # validate on this many global batches (the same items under any layout); 0: all
    save_every: int = 500  # steps between checkpoints (the last step is always saved)
    keep_last: int = 2  # checkpoints kept on disk (older ones are removed); 0 keeps every one
    log_every: int = 1  # steps between metrics lines
    seed: int = 1234  # seeds initialization, shuffling and the validation split
    # A step whose loss or gradient norm is not finite is skipped; a run that skipped more than this
    # share of its steps (or ends with non-finite weights) fails instead of writing DONE.
    max_skipped_fraction: float = 0.5

    def __post_init__(self):
        require_positive(self, "global_batch", "micro_batch", "save_every", "log_every", "epochs", prefix="train.")
        require_non_negative(self, "keep_last", "val_every", "val_batches", prefix="train.")
        if self.max_steps < -1 or self.max_steps == 0:
            raise ConfigError("train.max_steps", f"must be positive (or -1: as many as train.epochs gives), got "
                              f"{self.max_steps}")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ConfigError("train.max_skipped_fraction", f"must be in [0, 1], got {self.max_skipped_fraction}")
        require_seed(self, prefix="train.")


@dataclass
class LoggingConfig(Frozen):
    """metrics.jsonl always; TensorBoard and Weights & Biases when their extras are installed."""

    tensorboard: bool = False  # event files in the stage folder's tensorboard/ (extra: tensorboard)
    wandb: bool = False  # a wandb run per stage (extra: wandb; WANDB_MODE=offline on nodes without network)
    wandb_project: str = "offline-rlhf"  # the Weights & Biases project (logging.wandb=true)
    progress: bool = True  # show a progress bar while the stage runs

    def __post_init__(self):
        # At config validation, so a missing package stops the stage before it loads any data.
        for key in ("tensorboard", "wandb"):
            if getattr(self, key) and importlib.util.find_spec(key) is None:
                raise ConfigError(f"logging.{key}", f"is true but the {key} package is not installed",
                                  f"pip install 'offline-rlhf[{key}]', or set logging.{key}=false")


@dataclass
class InitConfig(Frozen):
    """Where the weights start: a checkpoint (root or step dir) from an earlier stage or
    `orlhf convert import_hf`; a Hugging Face model, as a local folder (config.json and
    safetensors) or a hub repo id `org/name[@revision]`, imported once into
    `run_dir/imported/`; or random (`checkpoint: ""`). offline_rlhf.hub tells ids from paths."""

    checkpoint: str = ""  # weights to start from: a checkpoint folder, a Hugging Face folder or repo id; empty: random
    tokenizer: str = ""  # a tokenizer dir or hub repo id; default: the checkpoint's own tokenizer/

    def require_tokenizer_source(self) -> None:
        """Random weights come with no tokenizer: one must be named (checked without torch
        by `orlhf STAGE --check`, and by the stages when they load it)."""
        if not self.tokenizer and not self.checkpoint:
            raise ConfigError("init.tokenizer", "is required when training from random weights",
                              "pass init.tokenizer=DIR or init.checkpoint=CKPT")


def check_file_input(list_key: str, name: str, path: str, kind: str, kinds: tuple[str, ...]) -> None:
    """One entry of a list of input files: a known kind and a path."""
    if kind not in kinds:
        raise ConfigError(f"{list_key}[{name or path}].kind", f"unknown kind {kind!r}", f"use {', '.join(kinds)}")
    if not path:
        raise ConfigError(f"{list_key}[{name or '?'}].path", "is required", "pass the file")


# How the decode step is compiled: torch.compile's default; inductor's coordinate-descent tuning
# only (on CUDA a one-row step's matrix products become tuned matrix-vector reductions); or
# max-autotune-no-cudagraphs (that tuning plus matrix-product templates). Graphs are ours.
COMPILE_MODES = ("default", "coordinate-descent", "max-autotune-no-cudagraphs")
DECODE_ATTENTION = ("sdpa", "flex")
# Below this temperature (vLLM's threshold) sampling is argmax decoding in all but name: a
# logit gap of 1e-3 already weighs exp(-100) there, and smaller temperatures overflow (or
# round to 0) in float32. A config must then say greedy; the server maps them to greedy.
MIN_TEMPERATURE = 1e-5


@dataclass
class GenerationConfig(Frozen):
    """`greedy` takes the argmax and ignores the sampling fields. Otherwise logits are
    divided by `temperature`, cut to the `top_k` most likely tokens (0: no cut) and then to
    the nucleus of mass `top_p` (1.0: no cut), and sampled at uniforms keyed by (`seed`,
    prompt id, sample index, step): a sampled answer does not depend on its batch or replica.
    `batch_size` decode slots run together (continuous batching: a finished answer's slot
    takes the next prompt at once); `n` answers per prompt share the prompt's prefill."""

    max_new_tokens: int = 256  # longest answer; longer ones are cut (finish_reason length)
    greedy: bool = True  # argmax decoding (temperature, top_p and top_k are then unused)
    temperature: float = 1.0  # sampling temperature, >= 1e-5
    top_p: float = 1.0  # nucleus sampling mass; 1: off
    top_k: int = 0  # sample among the k likeliest tokens; 0: off
    seed: int = 0  # sampling seed; with the prompt id and sample index it fixes every answer
    batch_size: int = 32  # decode slots (continuous batching)
    n: int = 1  # answers per prompt; more than one needs greedy=false (greedy ones would be copies)
    stop: list[str] = field(default_factory=list)  # an answer ends at the first of these strings (not kept)
    cuda_graphs: bool = True  # on CUDA, replay each bucketed decode shape as a CUDA graph (false: plain eager)
    compile: bool = True  # with cuda_graphs, torch.compile the decode step first (about a minute per process)
    compile_mode: str = "default"  # default | coordinate-descent | max-autotune-no-cudagraphs
    decode_attention: str = "sdpa"  # compiled steps: sdpa (a boolean mask) or flex (FlexAttention over each row's span)

    def __post_init__(self):
        self._check_decoding()
        self._check_counts()
        self._check_options()

    def _check_decoding(self) -> None:
        """An answer's length and its sampling settings."""
        if self.max_new_tokens < 1:
            raise ConfigError("generation.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.temperature < MIN_TEMPERATURE:
            raise ConfigError("generation.temperature", f"must be >= {MIN_TEMPERATURE}, got {self.temperature}",
                              "use greedy=true for argmax decoding")
        if not 0 < self.top_p <= 1:
            raise ConfigError("generation.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError("generation.top_k", f"must be >= 0 (0: off), got {self.top_k}")
        require_seed(self, prefix="generation.")

    def _check_counts(self) -> None:
        """The decode slots and the answers per prompt."""
        if self.batch_size < 1:
            raise ConfigError("generation.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.n < 1:
            raise ConfigError("generation.n", f"must be >= 1, got {self.n}")
        if self.n > 1 and self.greedy:  # argmax answers are n identical copies at n times the compute
            raise ConfigError("generation.n", f"is {self.n} with greedy decoding, which makes {self.n} identical "
                              "answers", "set generation.greedy=false to sample them, or generation.n=1")

    def _check_options(self) -> None:
        """The named choices of the decode step, and the stop strings."""
        for key, value, allowed in (("compile_mode", self.compile_mode, COMPILE_MODES),
                                    ("decode_attention", self.decode_attention, DECODE_ATTENTION)):
            if value not in allowed:
                raise ConfigError(f"generation.{key}", f"unknown value {value!r}", f"use one of {', '.join(allowed)}")
        if any(not stop for stop in self.stop):
            raise ConfigError("generation.stop", "holds an empty string", "remove it (it would end every answer)")
