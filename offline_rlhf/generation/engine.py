"""Batched generation with a static KV cache.

Prompts are sorted by length into batches (less padding), left-padded so every row's
last prompt token sits in the same column, prefilled in one forward pass, then decoded
one token per step until every row has emitted EOS or `max_new_tokens` are done.
Positions restart at 0 at each row's first real token and a mask hides the padding, so
a row's tokens do not depend on what it is batched with.

Tensor parallelism works from outside: every TP rank runs this same loop with the same
seed, gets the same (all-gathered) logits and so picks the same tokens; each rank's
cache holds only its own KV heads. Build the model with sequence_parallel and
loss_parallel off (decode steps have one token; sampling needs replicated logits).
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.generation.kv_cache import new_cache
from offline_rlhf.generation.sampling import sample_next
from offline_rlhf.models.llama import Transformer
from offline_rlhf.runtime import autocast_for


def generate(model: Transformer, prompts: list[list[int]], cfg: GenerationConfig, eos_id: int | Collection[int] | None,
             pad_id: int, device: torch.device | str) -> list[list[int]]:
    """The new tokens of each prompt, in input order. A response ends with its EOS token
    when the model emitted one (so a response without it hit `max_new_tokens`); `eos_id`
    None never stops early. One generator seeded with `cfg.seed` serves all batches, so
    sampled results depend on the seed, the prompts and the batch size."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    eos_ids = sorted({eos_id} if isinstance(eos_id, int) else set(eos_id or ()))
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    # Longest first: an out-of-memory batch size shows up on the first batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode(), autocast_for(torch.device(device)):
        for start in range(0, len(order), cfg.batch_size):
            chunk = order[start:start + cfg.batch_size]
            tokens = generate_batch(model, [prompts[i] for i in chunk], cfg, eos, pad_id, device, generator)
            for index, row in zip(chunk, tokens.tolist()):
                results[index] = _cut_after_eos(row, eos_ids)
    return results


def generate_batch(model: Transformer, prompts: list[list[int]], cfg: GenerationConfig, eos: torch.Tensor,
                   pad_id: int, device: torch.device | str, generator: torch.Generator) -> torch.Tensor:
    """[B, N] new tokens (N <= max_new_tokens; after a row's EOS, padding)."""
    tokens, real = left_pad(prompts, pad_id, device)  # [B, T] each
    batch, prompt_len = tokens.shape
    max_len = prompt_len + cfg.max_new_tokens  # cache slots: the padded prompts, then the new tokens
    if max_len > model.cfg.max_seq_len:
        raise ValueError(f"a prompt of {prompt_len} tokens + max_new_tokens={cfg.max_new_tokens} "
                         f"exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    # Which cache slots hold real tokens, [B, max_len]: the prompt's, then every generated one.
    real_slots = torch.ones(batch, max_len, dtype=torch.bool, device=device)
    real_slots[:, :prompt_len] = real
    lengths = real.sum(1)  # [B], also each row's next position
    cache = new_cache(len(model.layers), batch, max_len)

    positions = (real.cumsum(1) - 1).clamp(min=0)
    logits = model(tokens, positions, prefill_mask(real), cache=cache, last_only=True)[:, -1]
    out = torch.full((batch, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(cfg.max_new_tokens):
        token = sample_next(logits, cfg, generator).masked_fill(done, pad_id)  # [B]
        out[:, step] = token
        done |= torch.isin(token, eos)
        if step + 1 == cfg.max_new_tokens or bool(done.all()):
            break
        filled = prompt_len + step + 1  # cache slots in use once this token is written
        logits = model(token[:, None], (lengths + step)[:, None], real_slots[:, None, None, :filled],
                       cache=cache)[:, -1]
    return out[:, :step + 1]


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] right-aligned, and [B, T] bool True at real tokens."""
    width = max(map(len, prompts))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        real[row, width - len(prompt):] = True
    return tokens.to(device), real.to(device)


def prefill_mask(real: torch.Tensor) -> torch.Tensor:
    """real: [B, T] -> [B, 1, T, T] bool: causal, no padding keys. Each position may also
    attend to itself, so padding queries never have an all-False row (softmax over nothing
    gives NaN, which would reach real tokens through the cached values at those slots)."""
    width = real.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
    itself = torch.eye(width, dtype=torch.bool, device=real.device)
    return ((causal & real[:, None, :]) | itself).unsqueeze(1)


def _cut_after_eos(row: list[int], eos: list[int]) -> list[int]:
    for index, token in enumerate(row):
        if token in eos:
            return row[:index + 1]
    return row
