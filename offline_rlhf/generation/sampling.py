"""Choosing the next token from logits: argmax, or temperature / top-k / top-p sampling
driven by given uniforms, and the counter-based uniforms that make a sampled sequence a
function of (seed, stream, step) alone."""

from __future__ import annotations

import torch

from offline_rlhf.config.schema import GenerationConfig

MASK32 = 0xFFFFFFFF


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [B, V] -> token ids [B]. Sampling inverts each row's cumulative distribution
    at its uniform in [0, 1) ([B]), so the same uniforms and logits give the same tokens,
    whatever else is in the batch and on every TP rank."""
    if cfg.greedy:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        logits = keep_top_k(logits, cfg.top_k)
    if cfg.top_p < 1:
        logits = keep_top_p(logits, cfg.top_p)
    cumulative = logits.softmax(-1).cumsum(-1)
    # Scaled to the row's total, so rounding in the cumsum never leaves u past the end.
    targets = (uniforms.to(cumulative) * cumulative[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cumulative, targets, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf ([B, V]; ties at the
    k-th value all stay)."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability
    reaches p. A token is dropped when the tokens ranked before it already hold >= p, so
    the most likely token always stays. logits: [B, V]."""
    sorted_logits, order = logits.sort(-1, descending=True)
    sorted_probs = sorted_logits.softmax(-1)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    drop = torch.empty_like(mass_before, dtype=torch.bool).scatter_(-1, order, mass_before >= p)
    return logits.masked_fill(drop, float("-inf"))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (the `lowbias32` hash: xor-shift-multiply rounds) on
    int64 tensors holding values below 2**32; products wrap and are masked back."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def keyed_uniforms(seed: int, streams: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[B] uniforms in [0, 1), a pure function of (seed, stream, step) per row: the stream
    of a row is its (prompt id, sample index) pair folded into one int64 (`stream_id`), the
    step its number of tokens so far. Counter-based, so no generator state depends on the
    order rows are decoded in, how many share a batch, or on which replica they run."""
    x = _mix32((streams & MASK32) ^ _mix32(torch.full_like(streams, seed & MASK32)))
    x = _mix32(x ^ ((streams >> 32) & MASK32))
    x = _mix32(x ^ (steps & MASK32))
    return (x >> 8).double() / float(1 << 24)


def stream_id(prompt_id: int, sample_index: int) -> int:
    """One int64 per sampled sequence: the prompt id in the low 32 bits, the sample index above."""
    return (sample_index << 32) | (prompt_id & MASK32)
