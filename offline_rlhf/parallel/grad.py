"""Gradient-norm clipping over a mix of DTensor and plain parameters.

`torch.nn.utils.clip_grad_norm_` refuses a mix of DTensors and plain tensors, which is
exactly what TP without FSDP produces (norm weights stay plain). Here each gradient's
local squared norm is summed with others sharded the same way, and each group is
all-reduced once over the mesh dimensions it is sharded on (replicated dimensions hold
copies and must not be summed).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients in place so their global L2 norm is at most `max_norm` (`max_norm <= 0`:
    no clipping); returns the norm before clipping (a scalar tensor, identical on every rank)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = global_grad_norm(grads)
    if max_norm <= 0:
        return total
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    torch._foreach_mul_(locals_, coef.to(locals_[0].device))
    return total


def sum_head_norm_grads(model: torch.nn.Module) -> None:
    """Under tensor parallelism each rank normalizes its own heads' queries and keys (Qwen3's
    q_norm, k_norm) with weights every rank holds whole, so a rank's gradient of those weights
    covers its heads only. Summed over the TP group (`head_norm_group`, set by
    `apply_tensor_parallel`), every rank holds the whole gradient and the copies stay equal,
    as Megatron-LM does for its q/k layer norms. Call after backward, before clipping."""
    group = getattr(model, "head_norm_group", None)
    if group is None:
        return
    grads = [param.grad for name, param in model.named_parameters()
             if name.endswith(("q_norm.weight", "k_norm.weight")) and param.grad is not None]
    pieces = [grad.to_local() if isinstance(grad, DTensor) else grad for grad in grads]
    if not pieces:
        return
    flat = torch.cat([piece.reshape(-1) for piece in pieces])
    dist.all_reduce(flat, group=group)
    for piece, summed in zip(pieces, flat.split([piece.numel() for piece in pieces])):
        piece.copy_(summed.view_as(piece))


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    by_sharding: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        grad = _without_partial(grad)
        by_sharding[_sharded_groups(grad)].append(grad.to_local() if isinstance(grad, DTensor) else grad)
    total_sq = None
    for groups, tensors in by_sharding.items():
        sq = torch.stack(torch._foreach_norm(tensors, 2.0)).float().pow(2).sum()
        for group in groups:
            dist.all_reduce(sq, group=group)
        total_sq = sq if total_sq is None else total_sq + sq.to(total_sq.device)
    return total_sq.sqrt()


def _without_partial(grad: torch.Tensor) -> torch.Tensor:
    """Pending sums must be reduced before squaring (the square of a sum is not a sum of squares)."""
    if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
        return grad.redistribute(grad.device_mesh, [Replicate() if p.is_partial() else p for p in grad.placements])
    return grad


def _sharded_groups(grad: torch.Tensor) -> tuple:
    """Process groups of the mesh dimensions this gradient is split over (empty if replicated)."""
    if not isinstance(grad, DTensor):
        return ()
    mesh = grad.device_mesh
    # Not `is_shard()`: FSDP x TP uses _StridedShard, which does not report itself as a Shard.
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(grad.placements)
                 if not placement.is_replicate())
