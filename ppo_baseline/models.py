"""What the PPO modules compute with their models, shared by the actor and the services.

A rollout batch travels as right-padded rows `prompt + response`: tokens [B, T] int64,
lengths [B] (real tokens per row) and mask [B, T] bool, True at response tokens. Position
t of every per-token tensor belongs to action token t (algorithm.py's alignment): its
log-prob log pi(x_t | x_<t) comes from the logits at t - 1, and so does its value
V(x_<t), read from the value head at t - 1. Position 0 is never an action.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from offline_rlhf.data.tokenize import IGNORE_INDEX
from offline_rlhf.parallel.logprobs import head_token_nll
from offline_rlhf.runtime import Runtime, autocast_for
from offline_rlhf.train.loop import Task, train_step
from ppo_baseline.config import PPOAlgorithmConfig
from ppo_baseline.wire import Payload, Schema, TensorSpec

B_T_LONG = TensorSpec(torch.int64, ("B", "T"))
B_T_MASK = TensorSpec(torch.bool, ("B", "T"))
B_T_FLOAT = TensorSpec(torch.float32, ("B", "T"))
SEQUENCES = Schema({"tokens": B_T_LONG, "mask": B_T_MASK, "lengths": TensorSpec(torch.int64, ("B",))})
SCORES = Schema({"rewards": TensorSpec(torch.float32, ("B",)), "raw": TensorSpec(torch.float32, ("B",))})
LOGPROBS = Schema({"logprobs": B_T_FLOAT})
VALUES = Schema({"values": B_T_FLOAT})
TRAIN = Schema({**SEQUENCES.tensors, "returns": B_T_FLOAT, "old_values": B_T_FLOAT}, meta={"step": int})
# critic_skipped_steps: its optimizer steps skipped for a non-finite loss or gradient norm (the actor bounds them)
TRAINED = Schema({}, meta={"step": int, "value_loss": float, "critic_skipped_steps": (int, float)})
STEP = Schema({}, meta={"step": int})
SAVED = Schema({}, meta={"step": int, "path": str})


def check_sequences(payload: Payload, vocab_size: int, max_len: int, limit: str) -> None:
    """What a model needs beyond the schema; a ValueError is the client's fault (HTTP 400).
    `limit` says what `max_len` is (a reward model's is its recorded training length)."""
    tokens, mask, lengths = (payload.tensors[k] for k in ("tokens", "mask", "lengths"))
    batch, width = tokens.shape
    if batch == 0 or width == 0:
        raise ValueError(f"empty batch: tokens has shape {list(tokens.shape)}")
    if width > max_len:
        raise ValueError(f"sequences of {width} tokens exceed {limit} ({max_len} tokens)")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    if lengths.min() < 1 or lengths.max() > width:
        raise ValueError(f"lengths must lie in [1, {width}], got [{lengths.min()}, {lengths.max()}]")
    real = torch.arange(width) < lengths[:, None]
    if bool((mask & ~real).any()) or bool(mask[:, 0].any()):
        raise ValueError("mask marks padding or position 0 (a response token needs a token before it)")


def action_scores(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                  entropy: bool = False) -> tuple[torch.Tensor, ...]:
    """(logp,) or with `entropy` (logp, entropy): [B, T] fp32 log pi(x_t | x_<t) at the action
    tokens `mask` of rows `tokens` [B, T] and the entropy of the distribution each action was
    drawn from (a metric, no gradient), 0 elsewhere, under the language model `model`. Its
    head runs at action positions only, a chunk at a time (`head_token_nll`): the [B, T, V]
    logits never exist (a tensor-parallel head aside)."""
    labels = torch.where(mask, tokens, IGNORE_INDEX)
    nll, kept, *more = model(tokens, head_fn=partial(head_token_nll, labels=labels, entropy=entropy))
    return tuple(_at_actions(value, kept) for value in (-nll, *more))


def _at_actions(shifted: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[B, T-1] per-label values (label t + 1 at t) -> [B, T] per action token, 0 off `kept`."""
    out = torch.zeros(kept.shape[0], kept.shape[1] + 1, dtype=torch.float32, device=shifted.device)
    out[:, 1:] = torch.where(kept, shifted, 0.0)
    return out


def shifted_values(values: torch.Tensor) -> torch.Tensor:
    """Value-head outputs [B, T] (at t: after reading x_<=t) -> [B, T] V(x_<t) per action t."""
    out = torch.zeros_like(values, dtype=torch.float32)
    out[:, 1:] = values[:, :-1].float()
    return out


def dp_rows(fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], batch: dict[str, torch.Tensor], rt: Runtime,
            batch_size: int) -> torch.Tensor:
    """fn over the rows of `batch` in chunks of `batch_size`, the rows split evenly over the
    data-parallel ranks and all-gathered back in order. Every rank runs the same number of
    forwards (FSDP gathers weights collectively), padding its share with copies of row 0."""
    dp = rt.dims.dp
    rows = next(iter(batch.values())).shape[0]
    share = math.ceil(rows / dp)
    rank = rt.dp_rank
    index = torch.arange(rank * share, (rank + 1) * share).clamp(max=rows - 1)
    mine = {key: value[index].to(rt.device) for key, value in batch.items()}
    outputs = []
    for start in range(0, share, batch_size):
        chunk = {key: value[start:start + batch_size] for key, value in mine.items()}
        outputs.append(fn(chunk))
    local = torch.cat(outputs).contiguous()
    if dp > 1:
        shares = [torch.empty_like(local) for _ in range(dp)]
        dist.all_gather(shares, local, group=rt.mesh.get_group("dp"))
        local = torch.cat(shares)
    return local[:rows].cpu()


@torch.no_grad()
def response_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], rt: Runtime, batch_size: int) -> torch.Tensor:
    """[B, T] log-probs of the response tokens under a language model: the reference policy,
    or the actor's before its update."""
    def forward(chunk):
        with autocast_for(rt.device):
            return action_scores(model, chunk["tokens"], chunk["mask"])[0]
    return dp_rows(forward, batch, rt, batch_size)


@torch.no_grad()
def critic_values(model: nn.Module, batch: dict[str, torch.Tensor], rt: Runtime, batch_size: int) -> torch.Tensor:
    """[B, T] V(x_<t) at the response tokens (0 elsewhere) from a value-head model."""
    def forward(chunk):
        with autocast_for(rt.device):
            return torch.where(chunk["mask"], shifted_values(model(chunk["tokens"])), 0.0)
    return dp_rows(forward, batch, rt, batch_size)


def minibatch_generator(seed: int, step: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + epoch)


def train_epochs(task: Task, model: nn.Module, optimizer, scheduler, data: dict[str, torch.Tensor],
                 cfg: PPOAlgorithmConfig, seed: int, step: int, grad_clip: float, rt: Runtime) -> dict[str, float]:
    """`cfg.epochs` passes over the rows of `data` (the whole rollout, on every rank) in
    minibatches of `cfg.minibatch` rows, in an order seeded by (seed, step, epoch); each
    minibatch is one optimizer step, data-parallel rank r taking its r-th contiguous share
    of it in micro-batches (train_step normalizes over the global minibatch, so any DP size
    makes the same step). Returns the metrics averaged over steps (the gradient norm over the
    steps taken: a skipped one's is not finite; absent when none was), and `skipped_steps`:
    how many were skipped for a non-finite loss or gradient norm (their weights unchanged)."""
    rows = next(iter(data.values())).shape[0]
    per_rank, rank = cfg.minibatch // rt.dims.dp, rt.dp_rank
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for epoch in range(cfg.epochs):
        order = torch.randperm(rows, generator=minibatch_generator(seed, step, epoch))
        for start in range(0, rows, cfg.minibatch):
            mine = order[start + rank * per_rank:start + (rank + 1) * per_rank]
            batches = [{key: value[mine[at:at + cfg.micro_batch]] for key, value in data.items()}
                       for at in range(0, per_rank, cfg.micro_batch)]
            metrics, _ = train_step(task, model, optimizer, batches, rt, grad_clip)
            scheduler.step()
            for key, value in metrics.items():
                if key != "grad_norm" or not metrics["skipped_step"]:
                    sums[key], counts[key] = sums.get(key, 0.0) + value, counts.get(key, 0) + 1
    skipped = sums.pop("skipped_step")
    return {**{key: value / counts[key] for key, value in sums.items()}, "skipped_steps": skipped}
