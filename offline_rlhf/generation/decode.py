"""One decode step: feed every busy slot its pending token, return each slot's next-token
logits.

Two forms of the same computation. `DynamicStep` runs over exactly the busy slots and the
columns in use (CPU, tensor parallelism). `StaticStep` rounds both up to buckets (batch:
powers of two up to the slot count; width: multiples of `WIDTH_BUCKET` columns), so each
step has one of a few fixed shapes; on CUDA each shape is captured once as a CUDA graph
and replayed, which removes the per-kernel launch cost that dominates small-batch decode.
Rows past the busy ones are free slots: they decode a dummy token into column 0 of their
own cache row, which the next prompt placed there overwrites before anything reads it.

The attention mask [rows, 1, 1, width] is built on the device from each slot's first and
current column; the host sends three int64 per row and nothing else.
"""

from __future__ import annotations

import torch

from offline_rlhf.generation.kv_cache import LayerKVCache, TokenWrite
from offline_rlhf.models.llama import Transformer

WIDTH_BUCKET = 256  # columns: a step attends to at most this many more than it needs


class DynamicStep:
    """The step at the exact shape of the moment (no padding rows or columns)."""

    def __init__(self, model: Transformer, cache: list[LayerKVCache], device: torch.device):
        self.model, self.cache, self.device = model, cache, device

    def __call__(self, tokens: list[int], columns: list[int], starts: list[int]) -> torch.Tensor:
        """Per busy slot: the token to feed, its cache column, the column its prompt starts
        at. Returns logits [busy, V]."""
        rows = torch.tensor([tokens, columns, starts], device=self.device)
        width = max(columns) + 1  # from the host's copy: no device sync
        return decode_logits(self.model, self.cache, rows, width)


class StaticStep:
    """The step at bucketed shapes; `graphs` captures and replays each shape on CUDA."""

    def __init__(self, model: Transformer, cache: list[LayerKVCache], device: torch.device, graphs: bool):
        self.model, self.cache, self.device = model, cache, device
        self.slots, self.max_width = cache[0].slots, cache[0].max_len
        self.graphs = graphs
        self.inputs = torch.zeros(3, self.slots, dtype=torch.long, device=device)  # token, column, start
        self.captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if graphs else None

    def __call__(self, tokens: list[int], columns: list[int], starts: list[int]) -> torch.Tensor:
        busy = len(tokens)
        rows, width = self.shape(busy, max(columns) + 1)
        dummy = [0] * (rows - busy)  # token 0 into column 0, attending to column 0 only
        self.inputs[:, :rows].copy_(torch.tensor([tokens + dummy, columns + dummy, starts + dummy]),
                                    non_blocking=True)
        if not self.graphs:
            return decode_logits(self.model, self.cache, self.inputs[:, :rows], width)[:busy]
        if (rows, width) not in self.captured:
            self.captured[rows, width] = self.capture(rows, width)
        graph, logits = self.captured[rows, width]
        graph.replay()
        return logits[:busy]

    def shape(self, busy: int, width: int) -> tuple[int, int]:
        """The bucket a step of `busy` rows over `width` columns runs in."""
        rows = min(1 << (busy - 1).bit_length(), self.slots)
        return rows, min(-(-width // WIDTH_BUCKET) * WIDTH_BUCKET, self.max_width)

    def capture(self, rows: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record the step at this shape. The warm-up runs (on a side stream, as capture
        requires) compute the current step for real; their cache writes are the ones the
        replay makes again, so they change nothing."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), _graph_autocast():
            for _ in range(2):
                decode_logits(self.model, self.cache, self.inputs[:, :rows], width)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), _graph_autocast():
            logits = decode_logits(self.model, self.cache, self.inputs[:, :rows], width)
        return graph, logits


def _graph_autocast():
    """bf16 autocast without its weight-cast cache: a cast cached outside a capture would be
    a tensor the graph never refreshes. (With bf16 weights there is nothing to cast.)"""
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


def decode_logits(model: Transformer, cache: list[LayerKVCache], rows: torch.Tensor, width: int) -> torch.Tensor:
    """rows: [3, S] (token, column, start) for slots 0..S-1 -> logits [S, V]. Each slot
    writes its token's k, v at its column and attends to its columns start..column."""
    tokens, columns, starts = rows
    keys = torch.arange(width, device=rows.device)
    mask = ((keys >= starts[:, None]) & (keys <= columns[:, None]))[:, None, None, :]  # [S, 1, 1, W]
    positions = (columns - starts)[:, None]
    writes = [TokenWrite(layer, columns, width) for layer in cache]
    return model(tokens[:, None], positions, mask, cache=writes)[:, -1]


def decode_step_for(model: Transformer, cache: list[LayerKVCache], device: torch.device, cuda_graphs: bool,
                    static: bool | None = None) -> DynamicStep | StaticStep:
    """CUDA graphs on CUDA when asked for and the model is whole on this device (a tensor-
    parallel model's collectives stay outside graphs); the dynamic step otherwise.
    `static=True` forces the bucketed shapes (without graphs off CUDA)."""
    if static is None:
        static = device.type == "cuda" and cuda_graphs and not _sharded(model)
    if not static:
        return DynamicStep(model, cache, device)
    return StaticStep(model, cache, device, graphs=device.type == "cuda" and cuda_graphs)


def _sharded(model: Transformer) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
