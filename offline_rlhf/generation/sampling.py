"""Choosing the next token from logits: argmax, or temperature / top-k / top-p sampling
driven by given uniforms, each row by its own rule, and the counter-based uniforms that
make a sampled sequence a function of (seed, stream, step) alone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from offline_rlhf.config.schema import GenerationConfig

MASK32 = 0xFFFFFFFF
# The token of a row whose logits are not finite (NaN, +inf, or all -inf): no vocabulary
# id, so the engine, which reads every token on the host anyway, refuses it there; deciding
# it on the device costs no host sync per step.
NOT_FINITE = -1


@dataclass(frozen=True)
class Rule:
    """How one row picks its tokens (a server's requests each bring their own)."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0

    @classmethod
    def of(cls, cfg: GenerationConfig) -> Rule:
        return cls(cfg.greedy, cfg.temperature, cfg.top_p)


class RowRules:
    """A batch's rules, one per row: as [B] / [B, 1] tensors, and what the host knows of
    them (which steps of `sample_next` any row needs)."""

    def __init__(self, rules: Sequence[Rule], device: torch.device | str):
        self.greedy = torch.tensor([rule.greedy for rule in rules], device=device).unsqueeze(-1)
        # A greedy row samples at temperature 1 (its draw is then replaced by its argmax).
        self.temperature = torch.tensor([1.0 if rule.greedy else rule.temperature for rule in rules],
                                        device=device).unsqueeze(-1)
        # A row without a nucleus keeps every token, also where its float32 cumulative mass
        # reaches 1 before the vocabulary's end (p = 1 would then cut its tail).
        nucleus = [not rule.greedy and rule.top_p < 1 for rule in rules]
        self.top_p = torch.tensor([rule.top_p if cut else math.inf for rule, cut in zip(rules, nucleus)],
                                  device=device).unsqueeze(-1)
        self.all_greedy = all(rule.greedy for rule in rules)
        self.any_greedy = any(rule.greedy for rule in rules)
        self.any_top_p = any(nucleus)


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, uniforms: torch.Tensor | None = None,
                rules: RowRules | None = None) -> torch.Tensor:
    """logits: [B, V] -> token ids [B] (NOT_FINITE for a row whose logits are not finite).
    Each row by its rule in `rules` (default: cfg's for every row; top_k is cfg's). Sampling
    inverts each row's cumulative distribution at its uniform in [0, 1) ([B]), so the same
    uniforms and logits give the same tokens, whatever else is in the batch and on every TP
    rank."""
    rules = rules or RowRules([Rule.of(cfg)] * logits.shape[0], logits.device)
    top, argmax = logits.max(-1, keepdim=True)  # a NaN anywhere in a row is its max
    if rules.all_greedy:
        tokens = argmax
    else:
        # Shifted so each row's largest logit is 0: dividing by a small temperature can then
        # only overflow to -inf (probability 0), never to inf or NaN, and the argmax keeps
        # the mass as the temperature goes to 0.
        scaled = (logits.float() - top.float()) / rules.temperature
        if cfg.top_k:
            scaled = keep_top_k(scaled, cfg.top_k)
        if rules.any_top_p:
            scaled = keep_top_p(scaled, rules.top_p)
        cumulative = scaled.softmax(-1).cumsum(-1)
        # Scaled to the row's total, so rounding in the cumsum never leaves u past the end.
        targets = (uniforms.to(cumulative) * cumulative[:, -1]).unsqueeze(-1)
        tokens = torch.searchsorted(cumulative, targets, right=True).clamp(max=logits.shape[-1] - 1)
        if rules.any_greedy:
            tokens = torch.where(rules.greedy, argmax, tokens)
    return torch.where(top.isfinite(), tokens, NOT_FINITE).squeeze(-1)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf ([B, V]; ties at the
    k-th value all stay)."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability
    reaches p (a number, or [B, 1] one per row). A token is dropped when the tokens ranked
    before it already hold >= p; the most likely token always stays, even where p rounds
    to 0 in float32. logits: [B, V]."""
    sorted_logits, order = logits.sort(-1, descending=True)
    sorted_probs = sorted_logits.softmax(-1)
    keep = sorted_probs.cumsum(-1) - sorted_probs < p
    keep[:, 0] = True
    drop = torch.empty_like(keep).scatter_(-1, order, ~keep)
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
