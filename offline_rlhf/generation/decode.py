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

A step's inputs live on the device, three int64 per row (`StepInputs`): the host
loads them when the set of busy slots changes (`load`), and in between each step's sampled
tokens become the next step's inputs on the device (`feed`), so the engine can launch a
step before it has read the last one's tokens. The attention mask [rows, 1, 1, width] is
built on the device from them (or, with FlexAttention, each row's span is read from them
directly).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.generation.kv_cache import LayerKVCache, TokenWrite
from offline_rlhf.models.llama import KeySpan, Transformer
from offline_rlhf.parallel.parallelize import is_sharded

WIDTH_BUCKET = 256  # columns: a step attends to at most this many more than it needs
DECODE_RECOMPILE_LIMIT = 64  # compilations of the decode step one process may make (see compiled_decode_logits)


class StepInputs(NamedTuple):
    """Per row of a step: the token to feed, the cache column its k, v go to, the column its
    prompt starts at. Three whole tensors, not views of one: a compiled step specializes on
    how a view sits in its base, and compiled FlexAttention on CPU takes only a step's
    inputs themselves as the bounds of each row's span."""

    tokens: torch.Tensor
    columns: torch.Tensor
    starts: torch.Tensor

    @classmethod
    def of(cls, rows: list[tuple[int, int, int]], device: torch.device) -> StepInputs:
        return cls(*(torch.tensor(values, dtype=torch.long, device=device) for values in zip(*rows)))

    def load(self, rows: list[tuple[int, int, int]]) -> None:
        for tensor, values in zip(self, torch.tensor(rows, dtype=torch.long).T):
            tensor.copy_(values, non_blocking=True)

    def feed(self, tokens: torch.Tensor) -> None:
        """The next step's inputs from this step's tokens [busy], on the device: each busy
        row feeds its new token at the next column (rows past them stay as they are)."""
        self.tokens[:tokens.shape[0]] = tokens
        self.columns[:tokens.shape[0]] += 1


class DynamicStep:
    """The step at the exact shape of the moment (no padding rows or columns)."""

    def __init__(self, model: Transformer, cache: list[LayerKVCache], device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self.inputs: StepInputs | None = None

    def load(self, rows: list[tuple[int, int, int]]) -> None:
        """Per busy slot (token to feed, its cache column, the column its prompt starts at)."""
        self.inputs = StepInputs.of(rows, self.device)

    def logits(self, width: int) -> torch.Tensor:
        """Next-token logits [busy, V] of the loaded rows over `width` columns (the host's
        count: no device sync)."""
        return decode_logits(self.model, buffers(self.cache), *self.inputs, width)

    def feed(self, tokens: torch.Tensor) -> None:
        self.inputs.feed(tokens)


class StaticStep:
    """The step at bucketed shapes; `graphs` captures and replays each shape on CUDA."""

    def __init__(self, model: Transformer, cache: list[LayerKVCache], limits: tuple[int, int], device: torch.device,
                 graphs: bool, forward: Callable[..., torch.Tensor] | None = None):
        """limits: (slots, columns) a step may use, at most the cache's. forward: a
        compiled form of `decode_logits` (default: itself)."""
        self.model, self.cache, self.device = model, cache, device
        self.slots, self.max_width = limits
        self.graphs, self.forward = graphs, forward or decode_logits
        self.inputs: dict[int, StepInputs] = {}  # per bucket of rows
        self.busy = 0
        self.captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if graphs else None

    def load(self, rows: list[tuple[int, int, int]]) -> None:
        """As `DynamicStep.load`; rows past the busy ones in the bucket get the dummy row."""
        self.busy = len(rows)
        bucket = self.shape(self.busy, 1)[0]
        dummy = [(0, 0, 0)] * (bucket - self.busy)  # token 0 into column 0, attending to column 0 only
        if bucket not in self.inputs:
            self.inputs[bucket] = StepInputs.of(rows + dummy, self.device)
        else:
            self.inputs[bucket].load(rows + dummy)

    def logits(self, width: int) -> torch.Tensor:
        rows, width = self.shape(self.busy, width)
        if not self.graphs:
            return self.forward(self.model, buffers(self.cache), *self.inputs[rows], width)[:self.busy]
        if (rows, width) not in self.captured:
            self.captured[rows, width] = self.capture(rows, width)
        graph, logits = self.captured[rows, width]
        graph.replay()
        return logits[:self.busy]

    def feed(self, tokens: torch.Tensor) -> None:
        self.inputs[self.shape(self.busy, 1)[0]].feed(tokens)

    def shape(self, busy: int, width: int) -> tuple[int, int]:
        """The bucket a step of `busy` rows over `width` columns runs in."""
        if width > self.max_width:  # the caller's bug: writes would spill into another row's columns
            raise ValueError(f"a decode step over {width} columns exceeds the cache's {self.max_width}")
        rows = min(1 << (busy - 1).bit_length(), self.slots)
        return rows, min(bucket_width(width), self.max_width)

    def capture(self, rows: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record the step at this shape. The warm-up runs (on a side stream, as capture
        requires) compute the current step for real; their cache writes are the ones the
        replay makes again, so they change nothing."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), _graph_autocast():
            for _ in range(2):
                self.forward(self.model, buffers(self.cache), *self.inputs[rows], width)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), _graph_autocast():
            logits = self.forward(self.model, buffers(self.cache), *self.inputs[rows], width)
        return graph, logits


def _graph_autocast():
    """bf16 autocast without its weight-cast cache: a cast cached outside a capture would be
    a tensor the graph never refreshes. (With bf16 weights there is nothing to cast.)"""
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


def bucket_width(width: int) -> int:
    """`width` columns rounded up to a whole number of width buckets."""
    return -(-width // WIDTH_BUCKET) * WIDTH_BUCKET


def buffers(cache: list[LayerKVCache]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.k, layer.v) for layer in cache]


def decode_logits(model: Transformer, kv: list[tuple[torch.Tensor, torch.Tensor]], tokens: torch.Tensor,
                  columns: torch.Tensor, starts: torch.Tensor, width: int, flex: bool = False) -> torch.Tensor:
    """Slots 0..S-1 (see `StepInputs`, each [S]) -> logits [S, V]. Each slot writes its
    token's k, v at its column of each layer's (k, v) cache and attends to its columns
    start..column: through a boolean mask [S, 1, 1, width], or with `flex` through
    FlexAttention given just (start, column) per row (fast only compiled)."""
    if flex:
        visible = KeySpan(starts, columns)
    else:
        keys = torch.arange(width, device=tokens.device)
        visible = ((keys >= starts[:, None]) & (keys <= columns[:, None]))[:, None, None, :]
    positions = (columns - starts)[:, None]
    writes = [TokenWrite(k, v, columns, width) for k, v in kv]
    return model(tokens[:, None], positions, visible, cache=writes)[:, -1]


@functools.cache
def compiled_decode_logits(mode: str = "default"):
    """The step through torch.compile: it fuses the elementwise work between the matrix
    products (norms, RoPE, residuals, mask, cache writes), which a graph would otherwise
    replay as hundreds of tiny kernels. Dynamic shapes: besides one row (which the compiler
    specializes), one compilation serves every bucket, and every model of the same shape
    (its parameters are inputs). `mode`: one of config.schema.COMPILE_MODES.

    Every model shape and dtype, one row or several, mask or FlexAttention is a compilation
    of its own, all counted against dynamo's recompile limit for `decode_logits` (8 by
    default): a process decoding with several models (eval of several checkpoints) passed
    it, and dynamo then ran the step uncompiled, which FlexAttention cannot do inside a
    graph capture. Calls reach this only while capturing, so the patched limit costs nothing
    per token."""
    if mode == "coordinate-descent":  # gpt-fast's setting, without max-autotune's template search
        compiled = torch.compile(decode_logits, dynamic=True, options={"coordinate_descent_tuning": True})
    else:
        compiled = torch.compile(decode_logits, dynamic=True, mode=mode)

    @functools.wraps(decode_logits)
    def within_recompile_budget(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=DECODE_RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)
    return within_recompile_budget


def decode_step_for(model: Transformer, cache: list[LayerKVCache], limits: tuple[int, int], device: torch.device,
                    cfg: GenerationConfig, static: bool | None = None) -> DynamicStep | StaticStep:
    """CUDA graphs (of the compiled step, if `cfg.compile`) on CUDA when asked for and the
    model is whole on this device (a tensor-parallel model's collectives stay outside
    graphs); the dynamic step otherwise. `static=True` forces the bucketed shapes
    (without graphs or compilation off CUDA)."""
    if static is None:
        static = device.type == "cuda" and cfg.cuda_graphs and not is_sharded(model)
    if not static:
        return DynamicStep(model, cache, device)
    graphs = device.type == "cuda" and cfg.cuda_graphs
    forward = None
    if graphs and cfg.compile:
        forward = functools.partial(compiled_decode_logits(cfg.compile_mode), flex=cfg.decode_attention == "flex")
    return StaticStep(model, cache, limits, device, graphs=graphs, forward=forward)

