"""One decode step: feed every busy slot its pending token, return each slot's next-token
logits.

Two forms of the same computation. `DynamicStep` runs over exactly the busy slots and the
columns in use (CPU, tensor parallelism). `StaticStep` rounds both up to buckets (batch:
powers of two up to the slot count; width: multiples of `WIDTH_BUCKET` columns), so each
step has one of a few fixed shapes; on CUDA the step is compiled (torch.compile, dynamic
shapes: one compilation for one row, one for several), each shape captured once as a CUDA
graph and replayed, which removes the per-kernel launch cost that dominates small-batch
decode (measured in docs/benchmarks.md).

Rows past the busy ones are free slots: they decode a dummy token into column 0 of their
own cache row, which the next prompt placed there overwrites before anything reads it.

A step's inputs live on the device, three int64 per row (token, column, start): the host
loads them when the set of busy slots changes (`load`), and in between each step's sampled
tokens become the next step's inputs on the device (`feed`), so the engine can launch a
step before it has read the last one's tokens. The attention mask [rows, 1, 1, width] is
built on the device from them.
"""

from __future__ import annotations

import functools

import torch

from offline_rlhf.generation.kv_cache import LayerKVCache, TokenWrite
from offline_rlhf.models.llama import Transformer

WIDTH_BUCKET = 256  # columns: a step attends to at most this many more than it needs


class DynamicStep:
    """The step at the exact shape of the moment (no padding rows or columns)."""

    def __init__(self, model: Transformer, cache: list[LayerKVCache], device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self.inputs = torch.zeros(0, 3, dtype=torch.long, device=device)

    def load(self, rows: list[tuple[int, int, int]]) -> None:
        """Per busy slot (token to feed, its cache column, the column its prompt starts at)."""
        self.inputs = torch.tensor(rows, device=self.device)

    def logits(self, width: int) -> torch.Tensor:
        """Next-token logits [busy, V] of the loaded rows over `width` columns (the host's
        count: no device sync)."""
        return decode_logits(self.model, buffers(self.cache), self.inputs, width)

    def feed(self, tokens: torch.Tensor) -> None:
        feed_inputs(self.inputs, tokens)


class StaticStep:
    """The step at bucketed shapes; `graphs` captures and replays each shape on CUDA;
    `compiled` runs it through torch.compile (two compilations: one row, several)."""

    def __init__(self, model: Transformer, cache: list[LayerKVCache], limits: tuple[int, int], device: torch.device,
                 graphs: bool, compiled: bool = False):
        """limits: (slots, columns) a step may use, at most the cache's."""
        self.model, self.cache, self.device = model, cache, device
        self.slots, self.max_width = limits
        self.graphs = graphs
        self.forward = compiled_decode_logits() if compiled else decode_logits
        # Per bucket of rows: [rows, 3] (token, column, start), a whole tensor, not a view
        # of a shared one (a compiled step would specialize on how a view sits in its base).
        self.inputs: dict[int, torch.Tensor] = {}
        self.busy = 0
        self.captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if graphs else None

    def load(self, rows: list[tuple[int, int, int]]) -> None:
        """As `DynamicStep.load`; rows past the busy ones in the bucket get the dummy row."""
        self.busy = len(rows)
        bucket = self.shape(self.busy, 1)[0]
        if bucket not in self.inputs:
            self.inputs[bucket] = torch.zeros(bucket, 3, dtype=torch.long, device=self.device)
        dummy = [(0, 0, 0)] * (bucket - self.busy)  # token 0 into column 0, attending to column 0 only
        self.inputs[bucket].copy_(torch.tensor(rows + dummy), non_blocking=True)

    def logits(self, width: int) -> torch.Tensor:
        rows, width = self.shape(self.busy, width)
        if not self.graphs:
            return self.forward(self.model, buffers(self.cache), self.inputs[rows], width)[:self.busy]
        if (rows, width) not in self.captured:
            self.captured[rows, width] = self.capture(rows, width)
        graph, logits = self.captured[rows, width]
        graph.replay()
        return logits[:self.busy]

    def feed(self, tokens: torch.Tensor) -> None:
        feed_inputs(self.inputs[self.shape(self.busy, 1)[0]], tokens)

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
                self.forward(self.model, buffers(self.cache), self.inputs[rows], width)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), _graph_autocast():
            logits = self.forward(self.model, buffers(self.cache), self.inputs[rows], width)
        return graph, logits


def _graph_autocast():
    """bf16 autocast without its weight-cast cache: a cast cached outside a capture would be
    a tensor the graph never refreshes. (With bf16 weights there is nothing to cast.)"""
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


def feed_inputs(inputs: torch.Tensor, tokens: torch.Tensor) -> None:
    """The next step's inputs from this step's tokens [busy], on the device: each busy row
    feeds its new token at the next column (dummy rows past them stay as they are)."""
    inputs[:tokens.shape[0], 0] = tokens
    inputs[:tokens.shape[0], 1] += 1


def buffers(cache: list[LayerKVCache]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.k, layer.v) for layer in cache]


def decode_logits(model: Transformer, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor,
                  width: int) -> torch.Tensor:
    """rows: [S, 3] (token, column, start) of slots 0..S-1 -> logits [S, V]. Each slot
    writes its token's k, v at its column of each layer's (k, v) cache and attends to its
    columns start..column."""
    tokens, columns, starts = rows.unbind(1)
    keys = torch.arange(width, device=rows.device)
    mask = ((keys >= starts[:, None]) & (keys <= columns[:, None]))[:, None, None, :]  # [S, 1, 1, W]
    positions = (columns - starts)[:, None]
    writes = [TokenWrite(k, v, columns, width) for k, v in kv]
    return model(tokens[:, None], positions, mask, cache=writes)[:, -1]


@functools.cache
def compiled_decode_logits():
    """The step through torch.compile: it fuses the elementwise work between the matrix
    products (norms, RoPE, residuals, mask, cache writes), which a graph would otherwise
    replay as hundreds of tiny kernels. Dynamic shapes: besides one row (which the compiler
    specializes), one compilation serves every bucket, and every model of the same shape
    (its parameters are inputs)."""
    return torch.compile(decode_logits, dynamic=True)


def decode_step_for(model: Transformer, cache: list[LayerKVCache], limits: tuple[int, int], device: torch.device,
                    cuda_graphs: bool, compile_step: bool, static: bool | None = None) -> DynamicStep | StaticStep:
    """CUDA graphs (of the compiled step, if `compile_step`) on CUDA when asked for and the
    model is whole on this device (a tensor-parallel model's collectives stay outside
    graphs); the dynamic step otherwise. `static=True` forces the bucketed shapes
    (without graphs or compilation off CUDA)."""
    if static is None:
        static = device.type == "cuda" and cuda_graphs and not _sharded(model)
    if not static:
        return DynamicStep(model, cache, device)
    graphs = device.type == "cuda" and cuda_graphs
    return StaticStep(model, cache, limits, device, graphs=graphs, compiled=graphs and compile_step)


def _sharded(model: Transformer) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
