"""Choosing the next token from logits: argmax, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import torch

from offline_rlhf.config.schema import GenerationConfig


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] -> token ids [B]. Sampling draws only from `generator`, so the same
    seed and logits give the same tokens (on every TP rank too)."""
    if cfg.greedy:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        logits = keep_top_k(logits, cfg.top_k)
    if cfg.top_p < 1:
        logits = keep_top_p(logits, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


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
