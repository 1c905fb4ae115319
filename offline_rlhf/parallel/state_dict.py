"""Move whole (unsharded) state dicts in and out of a parallelized model.

Used to load weights made whole in one process into any layout (a CPU model's seeded
initialization, `parallelize._init_like_one_process`; the reward model's new value head,
`stages.rm`), by tests that compare layouts, and to refresh an inference replica from a
training model (the PPO actor samples with one, `ppo_baseline.actor`). Sharded training
checkpoints go through `offline_rlhf.checkpoint` (DCP) instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Every rank passes the full tensors; each keeps its own shards."""
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=strict))


@torch.no_grad()
def copy_parameters(source: nn.Module, target: nn.Module) -> None:
    """Copy every parameter of `source` into the same-named one of `target`, the two in any
    layouts (e.g. a training model under FSDP x TP into an inference replica under TP only).
    A collective when either is sharded: every rank calls it. One full parameter at a time
    is materialized, never the whole model."""
    targets = dict(target.named_parameters())
    for name, param in source.named_parameters():
        value = param.full_tensor() if isinstance(param, DTensor) else param
        into = targets[name]
        if isinstance(into, DTensor):  # every rank holds the full value: slice locally, no communication
            value = distribute_tensor(value, into.device_mesh, into.placements, src_data_rank=None)
        into.copy_(value)
