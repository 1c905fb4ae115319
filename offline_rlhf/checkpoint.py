"""Sharded, resharding, atomic checkpoints with torch.distributed.checkpoint (DCP).

Layout of a checkpoint root (e.g. `run_dir/sft/checkpoints/`):

    step_00000100/          one complete checkpoint
        .metadata *.distcp  model (+ optimizer) tensors, saved by DCP from any layout
        rng/rank00000.pt    each rank's RNG state
        tokenizer/          optional copy of the tokenizer files
        meta.json           step, tokens seen, data position, scheduler, model config; written last
    latest                  text file naming the newest complete step directory

A save writes into `step_XXXXXXXX.partial`, writes `meta.json`, renames the folder, and
only then replaces `latest` (itself written to a temporary file and renamed). A process
killed at any point leaves `latest` on the previous complete checkpoint.
Tensors are stored by fully-qualified parameter name, so a checkpoint saved at TP=2 x DP=2
loads into TP=1 x DP=1 (DCP reshards on load).
Saves and loads are collective over `group`, the stage's process group (`Runtime.group`;
None: one process, or the default group where a caller has no runtime).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from offline_rlhf.checkpoint_meta import (
    CONFIG_KEY,
    LATEST,
    META,
    PARTIAL_SUFFIX,
    REWARD_STATS,
    TEMPLATE,
    TOKENIZER_DIR,
    CheckpointMeta,
    TrainState,
    is_complete,
    latest_checkpoint,
    read_meta,
    resolve_checkpoint,
    step_dir_name,
)
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.fsutil import fsync_dir, write_atomic

# The metadata half lives in checkpoint_meta (torch-free): code that must not load torch
# (`--check`) imports it from there, the stages import both halves from here.
__all__ = ["CONFIG_KEY", "LATEST", "META", "PARTIAL_SUFFIX", "REWARD_STATS", "TEMPLATE", "TOKENIZER_DIR",
           "CheckpointMeta", "TrainState", "is_complete", "latest_checkpoint", "load_checkpoint", "read_meta",
           "resolve_checkpoint", "save_checkpoint", "step_dir_name"]


def save_checkpoint(root: str | Path, model: nn.Module, meta: CheckpointMeta,
                    optimizer: torch.optim.Optimizer | None = None, tokenizer_dir: str | Path | None = None,
                    keep_last: int | None = None, group: dist.ProcessGroup | None = None) -> Path:
    """Collective: every rank of `group` calls it. Returns the final checkpoint directory."""
    root = Path(root)
    final = root / step_dir_name(meta.train_state.step)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if _rank(group) == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"step_*{PARTIAL_SUFFIX}"):  # left over by killed saves (of any step)
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir()
    _barrier(group)
    meta.has_optimizer = optimizer is not None
    meta.world_size = _world_size(group)
    with _single_process_quiet():
        dcp.save(_tensor_state(model, optimizer), checkpoint_id=partial, process_group=group)
    _save_rng(partial, _rank(group))
    _barrier(group)
    if _rank(group) == 0:
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, partial / TOKENIZER_DIR)
        write_atomic(partial / META, json.dumps(asdict(meta), indent=2))
        _publish(partial, final)
        if keep_last:
            _prune(root, keep_last, final)
    _barrier(group)
    return final


def _publish(partial: Path, final: Path) -> None:
    """The rename makes the checkpoint visible; `latest` moves only after it. A step saved
    again (a resume that reaches the step `latest` names) first moves the old folder aside,
    deleted once the new one is in place: a kill while a large checkpoint was being deleted
    left `latest` naming a half-deleted folder; now only two renames lie between. The folder
    aside ends in PARTIAL_SUFFIX, so a save after such a kill clears it."""
    replaced = final.with_name(final.name + ".replaced" + PARTIAL_SUFFIX)
    if final.exists():
        os.replace(final, replaced)
    os.replace(partial, final)
    fsync_dir(final.parent)
    write_atomic(final.parent / LATEST, final.name + "\n")
    shutil.rmtree(replaced, ignore_errors=True)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = False, may_lack: tuple[str, ...] = (),
                    group: dist.ProcessGroup | None = None) -> CheckpointMeta:
    """Collective over `group`. Loads model (and optimizer) shards for the current layout, whatever layout
    saved them. RNG is restored only when the world size is unchanged (states are per rank).
    Parameters named in `may_lack` may be absent from the checkpoint and keep their values
    (a reward model's new scalar head from an SFT checkpoint); any other absence is an error."""
    path = Path(path)
    meta = read_meta(path)
    if optimizer is not None and not meta.has_optimizer:
        raise ValueError(f"{path} holds no optimizer state; load it as weights only (optimizer=None)")
    saved = _read_dcp_metadata(path)
    target = optimizer
    if optimizer is not None and _saved_groups(saved) == 1 < len(optimizer.param_groups):
        optimizer = _one_group_like(optimizer)  # saved before weight decay spared 1-D parameters
    state = _tensor_state(model, optimizer)
    _check_shard_sizes(path, saved)
    lacking = _lacking(saved, state["model"])
    unexpected = sorted(lacking - set(may_lack))
    if unexpected:
        raise ValueError(f"{path} lacks {len(unexpected)} parameter(s) of this model, first {unexpected[:3]}; "
                         "is it a checkpoint of another architecture?")
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=bool(lacking)),
                 process_group=group)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for param, param_state in optimizer.state.items():  # the moments move to this run's groups
            target.state[param] = param_state
    if restore_rng and meta.world_size == _world_size(group):
        _load_rng(path, _rank(group))
    return meta


def _saved_groups(saved: Any) -> int:
    """How many parameter groups the checkpoint's optimizer had (its DCP metadata `saved`)."""
    prefix = "optim.param_groups."
    return len({key[len(prefix):].split(".")[0] for key in saved.state_dict_metadata if key.startswith(prefix)})


def _one_group_like(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An optimizer of the same kind and settings over the same parameters in one group, to
    load a one-group checkpoint into; its per-parameter state then moves to `optimizer`."""
    one = type(optimizer)([param for group in optimizer.param_groups for param in group["params"]])
    one.param_groups[0].update(optimizer.defaults)  # never steps: its settings only name what DCP loads
    return one


def _lacking(saved: Any, model_state: dict[str, Any]) -> set[str]:
    """Model parameter names the checkpoint (its DCP metadata `saved`) does not hold."""
    return {name for name in model_state if f"model.{name}" not in saved.state_dict_metadata}


def damaged(file: Path, problem: str) -> ConfigError:
    """One line naming the damaged file and the way out (every rank raises it alike)."""
    return ConfigError(str(file), f"the checkpoint is damaged ({problem})",
                       f"load an earlier step_* folder of {file.parent.parent} (write its name into "
                       f"{file.parent.parent / LATEST} to resume from it), or re-run the stage that wrote it")


def _read_dcp_metadata(path: Path) -> Any:
    """DCP's `.metadata`; a truncated or corrupt one is a damaged checkpoint, not a traceback."""
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except (EOFError, pickle.UnpicklingError, AttributeError, ImportError, IndexError, TypeError, ValueError,
            KeyError, UnicodeDecodeError) as exc:
        raise damaged(path / ".metadata", f"unreadable: {type(exc).__name__}") from None


def _check_shard_sizes(path: Path, metadata: Any) -> None:
    """Every `*.distcp` shard must reach the end of the last tensor `.metadata` places in it:
    a truncated shard (a copy cut short, a full disk) otherwise fails deep inside DCP's reader."""
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name, end = getattr(info, "relative_path", None), getattr(info, "offset", 0) + getattr(info, "length", 0)
        if isinstance(name, str):
            needed[name] = max(needed.get(name, 0), end)
    for name, end in sorted(needed.items()):
        shard = path / name
        size = shard.stat().st_size if shard.is_file() else None
        if size is None:
            raise damaged(shard, "the shard is missing")
        if size < end:
            raise damaged(shard, f"the shard is truncated: {size} bytes, .metadata expects at least {end}")


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _rng_file(path: Path, rank: int) -> Path:
    return path / "rng" / f"rank{rank:05d}.pt"


def _save_rng(path: Path, rank: int) -> None:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    target = _rng_file(path, rank)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)


def _load_rng(path: Path, rank: int) -> None:
    file = _rng_file(path, rank)
    try:
        state = torch.load(file, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:  # missing, truncated, corrupt
        raise damaged(path / file.parent.name, f"{file.name} is unreadable: {type(exc).__name__}") from None
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _prune(root: Path, keep_last: int, saved: Path) -> None:
    """Keep `saved` (the step just saved, which `latest` names) and `keep_last` - 1 other
    complete steps, the run's own earlier ones first (newest first): steps above `saved`
    are left from before a resume from an earlier one (a run rolled back) and must not push
    out the checkpoint it continues from; they go first."""
    others = [p for p in root.glob("step_*") if is_complete(p) and p != saved]
    ranked = sorted((p for p in others if p.name < saved.name), reverse=True) + \
        sorted((p for p in others if p.name > saved.name), reverse=True)
    for old in ranked[max(keep_last - 1, 0):]:
        shutil.rmtree(old)


@contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save/load, which is an intended mode here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _barrier(group: dist.ProcessGroup | None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)
