"""What the stages share below their `main`s: where a stage's architecture, tokenizer and
weights come from (Hugging Face models imported on the fly included), the resume
fingerprint that keeps a rerun from mixing two experiments, and the DONE marker that ends
a stage."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import struct
import tempfile
import time
import warnings
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path

import torch
from torch import nn

from offline_rlhf.checkpoint import (
    CONFIG_KEY,
    META,
    REWARD_STATS,
    TEMPLATE,
    TOKENIZER_DIR,
    CheckpointMeta,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from offline_rlhf.checkpoint_meta import checkpoint_of_head
from offline_rlhf.config.base import freeze
from offline_rlhf.config.errors import ConfigError, ResumeRefused
from offline_rlhf.config.schema import InitConfig, ModelConfig, TemplateConfig
from offline_rlhf.data.chat_template import ChatFormat, build_template
from offline_rlhf.data.packing import PackedSequence
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenizer import TOKENIZER_FILE, Tokenizer
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.host import DONE, acquire_stage_lock, release_stage_lock
from offline_rlhf.hub import MODEL_FILES, TOKENIZER_FILES, parse_repo_id, resolve_dir
from offline_rlhf.models.hf import (
    CONFIG_FILE,
    HFWeights,
    copy_tokenizer_files,
    hf_head,
    load_hf_weights,
    read_hf_config,
)
from offline_rlhf.models.llama import Transformer, fuse_projections
from offline_rlhf.parallel.parallelize import build_inference_model
from offline_rlhf.runtime import Runtime
from offline_rlhf.stage_checks import note_once

IMPORTED_DIR = "imported"  # run_dir/imported/<model>: Hugging Face init checkpoints, imported once per run
IMPORT_POLL_SECONDS = 2.0  # how often a process waits on another one's import
# Checkpoint metadata of an import into run_dir/imported/: its source, when, and the source's
# `source_fingerprint`, which tells a later stage whether the folder changed since.
IMPORTED_FROM = "imported_from"
# Checkpoint metadata of an imported reward model whose config.json pad_token_id is its EOS
# (common for TRL's): transformers reads its score at the last token that is not this id,
# the one before a trailing EOS, and so does our scoring (labeling.scoring).
SCORED_BEFORE_TOKEN = "scored_before_token"


def empty_model(cfg: ModelConfig, head: str, dtype: torch.dtype = torch.float32) -> Transformer:
    """A CPU model with uninitialized weights in `dtype`: every parameter is about to be
    loaded, so random init (minutes for 8B) would be wasted, and a model held in another
    dtype than it is loaded or written in would need a second copy (70B: 280 GB in fp32)."""
    with torch.device("meta"):
        model = Transformer(cfg, head).to(dtype)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_buffers("cpu")
    return model


def import_hf(hf_dir: str | Path, out: str | Path, head: str = "lm", metadata: dict | None = None) -> tuple[Path, str]:
    """A Hugging Face directory (config.json, safetensors, tokenizer files) as our checkpoint
    `out/step_00000000/` in the weights' own dtype (bf16 stays bf16: a stage loading it casts
    exactly, and the import holds one copy of the model, not an fp32 one twice its size),
    `metadata` added to its own. Returns its path and a line saying what was imported."""
    cfg = read_hf_config(hf_dir)
    weights = HFWeights(hf_dir)
    model = empty_model(cfg, head, weights.dtype())
    load_hf_weights(model, weights)
    hf_config = json.loads((Path(hf_dir) / CONFIG_FILE).read_text())
    with tempfile.TemporaryDirectory() as staging:
        # save_checkpoint copies a whole folder; stage only the tokenizer files, not the weights.
        copied = copy_tokenizer_files(hf_dir, staging)
        scoring = reward_import_metadata(hf_config, Path(staging)) if head == "value" else {}
        meta = CheckpointMeta(model=cfg, head=head, train_state=TrainState(step=0),
                              metadata={**scoring, **(metadata or {})})
        path = save_checkpoint(out, model, meta, tokenizer_dir=staging if copied else None)
    scored = (f", scored at the last token before a trailing EOS (pad_token_id {scoring[SCORED_BEFORE_TOKEN]} is "
              "its EOS), as transformers scores it") if SCORED_BEFORE_TOKEN in scoring else ""
    return path, (f"imported {hf_dir} -> {path}: {num_params(model):,} parameters, {cfg.n_layers} layers, head={head}, "
                  f"tokenizer files {copied or 'none'}{scored}")


def reward_import_metadata(hf_config: dict, tokenizer_dir: Path) -> dict:
    """What an imported reward model's metadata records from its config.json: the
    normalization statistics of one exported by `orlhf convert`, and `SCORED_BEFORE_TOKEN`
    when its pad_token_id is its EOS (config.json's eos_token_id or the tokenizer's)."""
    stats = hf_config.get(REWARD_STATS)
    eos = hf_config.get("eos_token_id")
    ends = set(eos if isinstance(eos, list) else [eos])
    if (tokenizer_dir / TOKENIZER_FILE).is_file():
        ends.add(Tokenizer.from_dir(tokenizer_dir).eos_id)
    pad = hf_config.get("pad_token_id")
    return {**({REWARD_STATS: stats} if isinstance(stats, dict) else {}),
            **({SCORED_BEFORE_TOKEN: pad} if pad is not None and pad in ends else {})}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def local_init(init: InitConfig, run_dir: str | Path) -> InitConfig:
    """`init` with Hugging Face sources made local: a hub tokenizer becomes its snapshot
    folder; a hub repo id or local HF directory in `checkpoint` becomes its import under
    `run_dir/imported/` (made once; later stages and reruns of the run reuse it)."""
    tokenizer = init.tokenizer
    if parse_repo_id(tokenizer, "init.tokenizer"):
        tokenizer = str(resolve_dir(tokenizer, "init.tokenizer", TOKENIZER_FILES))
    return freeze(replace(init, checkpoint=local_checkpoint(init.checkpoint, run_dir), tokenizer=tokenizer))


def local_checkpoint(source: str, run_dir: str | Path, key: str = "init.checkpoint") -> str:
    """`source` itself when it is one of our checkpoints; its import under
    `run_dir/imported/` when it is a hub repo id or a local Hugging Face directory."""
    if parse_repo_id(source, key) or (Path(source) / CONFIG_FILE).is_file():
        return str(imported_checkpoint(source, run_dir, key))
    return source


def imported_checkpoint(source: str, run_dir: str | Path, key: str = "init.checkpoint") -> Path:
    """The checkpoint imported from `source` (hub repo id or local HF directory) into
    `run_dir/imported/`. One process imports under the folder's lock; the others (ranks of
    the same job, stages started together) wait for its result instead of importing again."""
    out = Path(run_dir) / IMPORTED_DIR / _import_folder_name(source)
    while (done := latest_checkpoint(out)) is None:
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock, _ = acquire_stage_lock(out, "import")
        except ConfigError:  # another process holds the lock: it is importing this model
            time.sleep(IMPORT_POLL_SECONDS)
            continue
        try:
            if latest_checkpoint(out) is None:
                hf_dir = resolve_dir(source, key)
                record = {"source": source, "at": _utc_now(), "fingerprint": source_fingerprint(hf_dir)}
                print(f"{key}: " + import_hf(hf_dir, out, hf_head(hf_dir), {IMPORTED_FROM: record})[1], flush=True)
                return latest_checkpoint(out)
        finally:
            release_stage_lock(lock)
    check_import_current(done, source, key)
    return done


def check_import_current(done: Path, source: str, key: str) -> None:
    """Reuse the import `done` of `source`, saying so; a local folder that changed since
    (re-exported or trained on elsewhere) is refused: its import holds the old weights. A
    hub repo's import is taken as given (checking it would ask the hub at every stage)."""
    record = read_meta(done).metadata.get(IMPORTED_FROM) or {}
    made = record.get("at") or _utc_now((done / META).stat().st_mtime)  # an import made before the record
    if parse_repo_id(source) is None and record.get("fingerprint") not in (None, source_fingerprint(source)):
        raise ConfigError(key, f"{source} changed since it was imported into {done.parent} at {made} (its "
                          "config.json, tokenizer or weight files differ)",
                          f"delete {done.parent} to import it again, or restore the folder")
    note_once(f"{key}: reusing the import of {source} made at {made} ({done.parent})")


def source_fingerprint(hf_dir: str | Path) -> str:
    """sha256 over the bytes of the small files an import reads (config.json, the index,
    tokenizer files) and the name, size and modification time of its weight files (reading
    gigabytes at every stage start would take minutes)."""
    digest = hashlib.sha256()
    files = sorted({path for pattern in MODEL_FILES for path in Path(hf_dir).glob(pattern) if path.is_file()})
    for path in files:
        stat = path.stat()
        content = f"{stat.st_mtime_ns}".encode() if path.suffix == ".safetensors" else path.read_bytes()
        digest.update(f"{path.name}\0{stat.st_size}\0".encode() + content + b"\0")
    return digest.hexdigest()


def _utc_now(seconds: float | None = None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _import_folder_name(source: str) -> str:
    """`org--name[--revision]` for a repo id; for a local folder its name plus a hash of
    its absolute path, so two folders of one name do not share an import."""
    ref = parse_repo_id(source)
    if ref is not None:
        return ref.folder_name
    path = Path(source).resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def model_config(init: InitConfig, configured: ModelConfig) -> ModelConfig:
    """An init checkpoint fixes the architecture; `model=` applies to random init only.
    `init` has been through `local_init` (its checkpoint is a local one of ours)."""
    return read_meta(resolve_checkpoint(init.checkpoint, "init.checkpoint")).model if init.checkpoint else configured


def checkpoint_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer saved with checkpoint `path`, for a stage that only runs the model: one
    without a pad token pads with EOS, as the training stages do (padding is masked, so which
    id fills it never shows in an answer or a score)."""
    tokenizer = Tokenizer.from_dir(path / TOKENIZER_DIR)
    tokenizer.pad_with_eos()
    return tokenizer


def checkpoint_template(path: Path, metadata: dict, configured: TemplateConfig,
                        key: str | None = "template") -> ChatTemplate | ChatFormat:
    """The template checkpoint `path` was trained with (its metadata), else `configured`,
    for the tokenizer saved with it. `configured` (config key `key`) set to another than
    the recorded one is an error (`check_configured`); `key` None takes it as a fallback
    only (eval's one `template` for several models)."""
    tokenizer = Tokenizer.from_dir(path / TOKENIZER_DIR) if (path / TOKENIZER_DIR).is_dir() else None
    recorded = metadata.get(TEMPLATE)
    if recorded is not None and key is not None:
        check_configured(recorded, configured, key, path)
    return build_template(configured if recorded is None else recorded, tokenizer.config if tokenizer else {})


def init_template(init: InitConfig, configured: TemplateConfig, key: str,
                  tokenizer_config: dict) -> ChatTemplate | ChatFormat:
    """The template of a stage that continues `init.checkpoint` (align and PPO train it,
    reference scores with it): the one the checkpoint was trained with, as generate, eval
    and serve use it; `configured` when it records none (random init, an imported model).
    `configured` (config key `key`: `data.template` or `template`) is checked against the
    recorded one (`check_configured`). `init` has been through `local_init`."""
    recorded = None
    if init.checkpoint:
        path = resolve_checkpoint(init.checkpoint, "init.checkpoint")
        recorded = read_meta(path).metadata.get(TEMPLATE)
    if recorded is None:
        return build_template(configured, tokenizer_config)
    check_configured(recorded, configured, key, path)
    return build_template(recorded, tokenizer_config)


def check_configured(recorded: dict, configured: TemplateConfig, key: str, path: Path) -> None:
    """`configured` (config key `key`) left at its default adopts the template `path`
    recorded; set to another, it is an error naming the field to set and the recorded
    value (the model would be prompted, trained or scored in a format it never saw)."""
    wanted = asdict(configured)
    if configured != TemplateConfig() and (field := _first_difference(recorded, wanted)):
        trained = _template_field(recorded, field)
        setting = f"set {key}.{field}={_override(trained)}, or "
        if isinstance(trained, dict) and set(wanted[field]) - set(trained):
            setting = ""  # a dict override merges into the configured dict: its other variables would stay
        raise ConfigError(f"{key}.{field}", f"is {wanted.get(field)!r}, but {path} was trained with "
                          f"{field}={trained!r} (its metadata.template: {recorded})",
                          f"{setting}leave {key} at its default to use the checkpoint's")


def require_template(path: Path, metadata: dict, expected: dict, key: str, reader: str) -> None:
    """A model that reads another one's token ids (PPO's reward model, critic and reference
    read the policy's rollouts) must have been trained with that model's template
    (`expected`, a `template_record`), or it would score text laid out as it never saw it.
    A checkpoint that records none (an imported model) is taken as given."""
    recorded = metadata.get(TEMPLATE)
    if recorded is not None and (field := _first_difference(recorded, expected)):
        trained, wanted = _template_field(recorded, field), _template_field(expected, field)
        raise ConfigError(key, f"{path} was trained with template {field}={trained!r}, but {reader} renders with "
                          f"{field}={wanted!r} (metadata.template {recorded} vs {expected})",
                          f"pass a model trained with data.template.{field}={_override(wanted)}")


def require_tokenizer(path: Path, expected: Tokenizer, key: str, reader: str) -> None:
    """A model that reads another one's token ids must map them to the same tokens (two
    tokenizers of one vocabulary size can differ: Llama's and Mistral's both have 32000). A
    checkpoint saved without its tokenizer is taken as given."""
    if not (path / TOKENIZER_DIR).is_dir():
        return
    theirs, ours = Tokenizer.from_dir(path / TOKENIZER_DIR).backend.get_vocab(), expected.backend.get_vocab()
    if theirs != ours:
        differing = len(set(theirs.items()) ^ set(ours.items())) // 2
        raise ConfigError(key, f"{path} has another tokenizer than {reader} ({differing} token ids stand for "
                          "other tokens)", "pass a model trained with the policy's tokenizer")


# What a template record may leave out, and means then: a chat template's variables
# (template_record writes them only when set; older checkpoints have none).
UNRECORDED = {"kwargs": {}}


def _first_difference(recorded: dict, wanted: dict) -> str | None:
    """The first field of a recorded template (`kind` first, then what it may leave out) that
    `wanted` sets otherwise."""
    names = [*recorded, *(name for name in UNRECORDED if name not in recorded)]
    return next((name for name in names if _template_field(wanted, name) != _template_field(recorded, name)),
                None)


def _template_field(record: dict, name: str):
    """A template record's `name`, or what leaving it out means (`UNRECORDED`)."""
    return record.get(name, UNRECORDED.get(name))


HYDRA_WORDS = ("true", "false", "null", "inf", "nan")  # what an override reads as a bool, null or float


def _override(value) -> str:
    """`value` as a command-line override writes it: `chat` bare, `'User:'` quoted,
    template.kwargs as `{enable_thinking: false}`."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{name}: {_override(item)}" for name, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_override(item) for item in value) + "]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    bare = isinstance(value, str) and value.isidentifier() and value.lower() not in HYDRA_WORDS
    return value if bare else repr(value)


def dt_target(metadata: dict, path: Path, key: str = "reward_prompt") -> float | None:
    """The target score `orlhf align method=dt` recorded (a final checkpoint's `alignment`,
    an intermediate one's training config), None for a model not trained by DT. A DT
    checkpoint without one is an error naming `key`: used with no reward prompt, it would
    answer a prompt it never saw in training (`orlhf serve` and `orlhf eval` read it)."""
    alignment, trained = metadata.get("alignment") or {}, metadata.get(CONFIG_KEY) or {}
    if alignment.get("method", trained.get("method")) != "dt":
        return None
    target = alignment.get("dt_target", trained.get("dt_target"))
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ConfigError(key, f"{path} is a Decision-Transformer checkpoint whose metadata records no "
                          f"target score (dt_target: {target!r})", f"pass {key}=SCORE")
    return float(target)


def load_inference_model(path: Path, head: str, rt: Runtime, key: str, decoding: bool = False) -> nn.Module:
    """The checkpoint at `path` (resolved) in eval mode as a TP-only replica of the
    runtime's layout: replicas then generate independently (FSDP would make every
    replica run the same number of forwards). `decoding`: a model that only generates,
    kept in bf16 on CUDA (half the bytes a decode step reads); models that score
    (reference log-probs) keep fp32 weights, as the policy they are compared with does.
    A decoding model that is whole here (no tensor parallelism) also gets fused q/k/v and
    gate/up projections (`fuse_projections`): it can then no longer be saved. Built on the
    meta device and materialized uninitialized in its final dtype, which the load fills in:
    the weights never exist in fp32 on the device (twice a bf16 model's bytes) nor are they
    drawn at random first."""
    meta = checkpoint_of_head(path, head, key)
    model = empty_inference_model(meta.model, head, rt, decode_dtype(rt.device) if decoding else torch.float32)
    note_untrusted(path, rt)
    load_checkpoint(path, model, group=rt.group)
    if decoding and rt.dims.tp == 1:
        fuse_projections(model)
    return model.eval()


def empty_inference_model(cfg: ModelConfig, head: str, rt: Runtime, dtype: torch.dtype) -> Transformer:
    """`build_inference_model`'s model in the runtime's layout, materialized uninitialized in
    `dtype` on its device: its weights are about to be loaded or copied in, so they never
    exist in fp32 on the device first (twice a bf16 model's bytes) nor are drawn at random."""
    with warnings.catch_warnings():  # build_model's initialization of meta DTensors draws nothing
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        model = build_inference_model(cfg, head, rt.dims, rt.mesh, torch.device("meta"))
    model.to(dtype).to_empty(device=rt.device)
    model.tie_weights()
    model.init_buffers(rt.device)
    return model


def decode_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype of a model that only generates: bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def note_untrusted(path: Path, rt: Runtime) -> None:
    """DCP reads a checkpoint's `.metadata` with pickle, so loading one runs whatever code it
    names: say so when the checkpoint was not written inside this run directory."""
    run_dir = rt.stage_dir.parent.resolve()
    if not Path(path).resolve().is_relative_to(run_dir):
        rt.log(f"loading {path}, a checkpoint from outside this run ({run_dir}): checkpoints are unpickled, "
               "so load only ones you trust (exchange weights as Hugging Face safetensors)")


# Keys (fnmatch patterns) that may change between a run and its resumption: layout
# (checkpoints reshard; a PPO service's world and where it runs), logging, how long or how
# often things happen, and how fast answers are decoded (decode slots, CUDA graphs and
# compilation leave every answer as it is: tested) or scored (a scoring batch, lowered after
# running out of memory, moves a reward or log-prob by rounding at most).
RESUMABLE_CHANGES = ("run_dir", "parallel.*", "logging.*", "train.max_steps", "train.epochs", "train.val_every",
                     "train.micro_batch",  # accumulation: the loss is normalized over the global batch
                     "train.val_batches", "train.save_every", "train.keep_last", "train.log_every",
                     "*.max_skipped_fraction", "write_every", "batch_size", "ppo.iterations", "save_every", "keep_last",
                     "generation.batch_size", "generation.cuda_graphs", "generation.compile", "generation.compile_mode",
                     "generation.decode_attention", "services.host", "services.*_timeout_s", "services.max_body_mb",
                     "services.*.nproc", "services.*.parallel.*", "services.*.batch_size", "services.*.het_group",
                     "services.share_gpus")


def resume_fingerprint(cfg) -> dict[str, object]:
    """The config values a checkpoint (or a partial output) was made under, flattened to
    dotted keys, without the ones a resumed run may change. Paths inside the run are written
    relative to it (`${run_dir}/...`), and `run_dir` is kept to read older fingerprints by,
    so a run folder moved elsewhere (scratch to project storage) resumes."""
    run_dir = getattr(cfg, "run_dir", None)
    inside = within_run(run_dir)
    # An init checkpoint fixes the architecture: `model` is then unused (config_text says so).
    unused = ("model.*",) if getattr(getattr(cfg, "init", None), "checkpoint", None) else ()
    kept = {key: inside(value) for key, value in flatten(asdict(cfg)).items()
            if not any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_CHANGES + unused)}
    return kept if run_dir is None else {**kept, "run_dir": run_dir}


TRAINING_DATA = "training data"  # the key of a training run's fingerprint naming what it trains on


def training_fingerprint(cfg, train: Sequence, init: InitConfig) -> dict[str, object]:
    """`resume_fingerprint` plus a digest of the training items (their token ids and numbers):
    a checkpoint's data position indexes them, so a resume over input files rewritten since
    (a mix regenerated under the same path) would go on in other data. And the step `init`
    (local: `local_init`) starts from (`checkpoint_steps`)."""
    return {**resume_fingerprint(cfg), TRAINING_DATA: items_digest(train),
            **checkpoint_steps({"init.checkpoint": init.checkpoint})}


def checkpoint_steps(checkpoints: dict[str, str]) -> dict[str, str]:
    """The step each configured checkpoint (config key: path; empty: none) resolves to, as
    `<key>'s step`: a reward model resumed over an SFT trained again since would keep weights
    grown from the old one. Checkpoints written before these keys existed lack them, and a
    key only one side has is not compared."""
    return {f"{key}'s step": step_identity(resolve_checkpoint(path, key)) for key, path in checkpoints.items() if path}


def step_identity(checkpoint: Path) -> str:
    """A step folder as a fingerprint shows it: its name and the digest of its small files."""
    return f"{checkpoint.name} (sha256 {checkpoint_digest(checkpoint)[:16]})"


def items_digest(items: Sequence) -> str:
    """sha256 of the token ids and numbers in `items`: token-id sequences, or dataclasses
    holding them (PackedSequence, pairs, rewarded sequences); their texts are in the ids.
    A PackedSequence is read as input_ids, labels, positions, document_ids, the fields it
    had before it derived the last two from its documents' lengths: fingerprints, and so
    the checkpoints they guard, stay those of earlier runs."""
    digest = hashlib.sha256()

    def absorb(value) -> None:
        if isinstance(value, PackedSequence):
            for ids in (value.input_ids, value.labels, value.positions, value.document_ids):
                absorb(ids)
        elif is_dataclass(value):
            for item in fields(value):
                absorb(getattr(value, item.name))
        elif isinstance(value, (tuple, list, array)) and value and isinstance(value[0], int):
            digest.update(array("q", value).tobytes())
        elif isinstance(value, (int, float)):
            digest.update(struct.pack("<d", value))

    for item in items:
        absorb(item)
    return digest.hexdigest()


def model_fingerprint(cfg, checkpoint: Path) -> dict[str, object]:
    """`resume_fingerprint` plus the checkpoint step whose outputs (answers, log-probs) a
    partial output holds: the config names a root, and a model trained on since is another.
    A step folder replaced by another training's (same name) is told apart by its
    `checkpoint_digest`."""
    step = within_run(getattr(cfg, "run_dir", None))(str(checkpoint.resolve()))
    return {**resume_fingerprint(cfg), "model_step": step, "model_meta_sha256": checkpoint_digest(checkpoint)}


def checkpoint_digest(checkpoint: Path) -> str:
    """sha256 of a step folder's small files (meta.json: the training config and state;
    DCP's .metadata), which tells a step apart from another training's of the same name
    without reading the weight shards (*.distcp: gigabytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in checkpoint.iterdir() if p.is_file() and p.suffix != ".distcp"):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode() + path.read_bytes())
    return digest.hexdigest()


def within_run(run_dir: str | None) -> Callable[[object], object]:
    """A function that writes each path inside `run_dir` in a config value (a string, or
    one in a list or mapping) as `${run_dir}/...`, the run spelled as configured or resolved."""
    if not run_dir:
        return lambda value: value
    prefixes = {run_dir.rstrip("/") or "/", str(Path(run_dir).resolve())}

    def relative(value):
        if isinstance(value, str):
            prefix = next((p for p in prefixes if value == p or value.startswith(p.rstrip("/") + "/")), None)
            if prefix is None:
                return value
            # `run_dir=R/` interpolates `${run_dir}/task` as R//task: one slash, as R would.
            rest = value[len(prefix):].lstrip("/")
            return "${run_dir}" + (f"/{rest}" if rest else "")
        if isinstance(value, (list, tuple)):
            return [relative(item) for item in value]
        if isinstance(value, dict):
            return {key: relative(item) for key, item in value.items()}
        return value
    return relative


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_checkpoint_resumable(root: Path, fingerprint: dict) -> Path | None:
    """`check_resumable` against the latest checkpoint in `root`, which it returns (None: a
    fresh start). A stage calls it before writing anything a refused rerun must not change."""
    latest = latest_checkpoint(root)
    if latest is not None:
        check_resumable(read_meta(latest).metadata.get(CONFIG_KEY), fingerprint, root)
    return latest


def check_resumable(saved: dict | None, current: dict, where: Path) -> None:
    """A rerun may continue an earlier one only under the same config (apart from
    RESUMABLE_CHANGES); otherwise it would silently mix two experiments."""
    if saved is None:
        return
    # An older fingerprint holds absolute paths: as the run's, they are the current run's.
    inside = within_run(current.get("run_dir"))
    # Keys only one side has came with a newer or older version of the project, not the user,
    # unless the other side has the same field unset or set (`model.rope_scaling` None against
    # `model.rope_scaling.factor`: flattening splits a set sub-config into keys of its own).
    changed = sorted({k for k in set(saved) & set(current) - {"run_dir"} if inside(saved[k]) != current[k]}
                     | _unset_against_set(set(saved) ^ set(current)))
    if changed:
        first = changed[0]
        raise ResumeRefused(first, f"differs from the run that wrote {where} ({len(changed)} changed: "
                          f"{', '.join(changed[:4])}{'...' if len(changed) > 4 else ''}; {first} was "
                          f"{_shown(inside(_value(saved, first)))}, now {_shown(_value(current, first))})",
                          f"restore it, or delete {where} to start this stage over")


def _unset_against_set(one_sided: set[str]) -> set[str]:
    """Of the keys only one fingerprint has, those whose field the other has in another
    shape: `a` on one side beside `a.b` on the other."""
    return {key for key in one_sided if any(other.startswith(key + ".") for other in one_sided)}


def _value(fingerprint: dict, key: str) -> object:
    """A fingerprint's value of `key`, or of the sub-config flattened under it."""
    if key in fingerprint:
        return fingerprint[key]
    return {k[len(key) + 1:]: v for k, v in fingerprint.items() if k.startswith(key + ".")}


def _shown(value: object, limit: int = 60) -> str:
    """A config value in a one-line message, cut to `limit` characters."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def mark_done(rt: Runtime, result: str | Path) -> None:
    """The stage's last write: its outputs are complete (pipelines skip it on a rerun)."""
    if rt.is_main:
        write_atomic(rt.stage_dir / DONE, f"{result}\n")
