"""A static per-layer KV cache for incremental decoding.

Each layer's buffers are [B, H_kv_local, max_len, D], allocated on the first write (the
prefill), when the attention module shows how many KV heads it holds: all of them, or
its tensor-parallel shard. The model passes each layer's cache to `Attention.forward`.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.length = 0  # positions filled; every row shares it (prompts are left-padded)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, H, T, D] of the T new positions. Returns every cached k, v: [B, H, S, D]
        views of the buffers, S = positions filled so far."""
        if self.k is None:
            shape = (self.batch, k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take {end}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def new_cache(n_layers: int, batch: int, max_len: int) -> list[LayerKVCache]:
    return [LayerKVCache(batch, max_len) for _ in range(n_layers)]
