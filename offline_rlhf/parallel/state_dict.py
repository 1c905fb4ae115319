"""Move whole (unsharded) state dicts in and out of a parallelized model.

Used for Hugging Face import/export and for tests that compare layouts. Sharded
training checkpoints go through `offline_rlhf.checkpoint` (DCP) instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Every rank passes the full tensors; each keeps its own shards."""
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=strict))


def gather_full_state_dict(model: nn.Module, cpu: bool = True) -> dict[str, torch.Tensor]:
    """Full tensors (a collective: all ranks must call it): on every rank with `cpu=False`;
    with `cpu=True` offloaded to CPU on rank 0 only, the others get an empty dict. Names
    are the model's own, with wrapper prefixes (activation checkpointing, compile) removed."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu))
