"""A per-slot KV cache for continuous batching.

Each layer's buffers are [S, H_kv_local, L, D]: one row ("slot") per sequence being
decoded, allocated on the first write, when the attention module shows how many KV heads
it holds (all of them, or its tensor-parallel shard). The model passes each layer's cache
(or a view of it) to `Attention.forward`, which calls `update(k, v)` and attends to what
comes back. A slot is reused as soon as its sequence ends: a new prompt is prefilled into
its first columns and the stale columns after it are masked out.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    def __init__(self, slots: int, max_len: int):
        self.slots, self.max_len = slots, max_len
        self.length = 0  # columns filled by `update` (every slot alike)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def _allocate(self, k: torch.Tensor) -> None:
        # Zeros, not empty memory: a decode step attends over columns another slot has
        # filled but this one has not, masked out; an uninitialized NaN there would still
        # poison the output (masked score + NaN is NaN, weight 0 x NaN value is NaN).
        if self.k is None:
            shape = (self.slots, k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_zeros(shape), k.new_zeros(shape)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [S, H, T, D] at the same columns of every slot; returns every cached
        k, v [S, H, filled, D] (the plain static-batch use)."""
        self._allocate(k)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take {end}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def write_prompts(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefill: k, v [B, H, T, D] into columns 0..T-1 of `slots` [B]."""
        self._allocate(k)
        self.k[slots, :, :k.shape[2]] = k
        self.v[slots, :, :v.shape[2]] = v

    def copy_slot(self, source: int, target: int, columns: int) -> None:
        self.k[target, :, :columns] = self.k[source, :, :columns]
        self.v[target, :, :columns] = self.v[source, :, :columns]


class PromptWrite:
    """What prefill passes to a layer: store the prompts' k, v in their slots and attend
    to the prompts themselves."""

    def __init__(self, cache: LayerKVCache, slots: torch.Tensor):
        self.cache, self.slots = cache, slots

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.write_prompts(self.slots, k, v)
        return k, v


class TokenWrite:
    """What a decode step passes to a layer: store each slot's new k, v at its column and
    attend to columns 0..width-1 of slots 0..S'-1 (the caller's mask hides the rest).
    Holds the cache's tensors only, so a compiled step traces nothing but tensors."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, columns: torch.Tensor, width: int):
        self.k_cache, self.v_cache, self.columns, self.width = k_cache, v_cache, columns, width

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        write_columns(self.k_cache, self.columns, k)
        write_columns(self.v_cache, self.columns, v)
        active = k.shape[0]
        return self.k_cache[:active, :, :self.width], self.v_cache[:active, :, :self.width]


def write_columns(cache: torch.Tensor, columns: torch.Tensor, new: torch.Tensor) -> None:
    """Decode: one new position per slot, new [S', H, 1, D] of slots 0..S'-1, each at its
    own column `columns[s]` of cache [S, H, L, D]. As rows of a [S * H * L, D] view,
    (slot, head, column) is row (slot * H + head) * L + column; index_copy_ is a plain
    scatter, so the step can be captured in a CUDA graph."""
    heads, length, dim = cache.shape[1], cache.shape[2], cache.shape[3]
    first_rows = torch.arange(new.shape[0] * heads, device=new.device).view(-1, heads) * length
    rows = (first_rows + columns[:, None]).flatten()
    cache.view(-1, dim).index_copy_(0, rows, new[:, :, 0].reshape(-1, dim))


def new_cache(n_layers: int, slots: int, max_len: int) -> list[LayerKVCache]:
    return [LayerKVCache(slots, max_len) for _ in range(n_layers)]
