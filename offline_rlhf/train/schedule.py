"""Learning-rate schedules: linear warmup, then cosine decay or constant."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from offline_rlhf.config.schema import OptimConfig


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of cfg.lr for the optimizer step with 0-based index `step`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class AdamW(torch.optim.AdamW):
    """torch's AdamW, stepping each parameter group as two: its DTensors and its plain tensors.
    Under tensor parallelism without FSDP some parameters stay plain tensors (norms without
    sequence parallelism, the value head, Qwen3's q/k norms) beside DTensors, and one fused or
    foreach kernel over both raises 'got mixed torch.Tensor and DTensor'. The split exists only
    during step(): schedulers and checkpoints see the groups as built, whatever the layout."""

    def step(self, closure=None):
        groups = self.param_groups
        self.param_groups = [dict(group, params=part) for group in groups
                             for part in _by_kind(group["params"]) if part]
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


def _by_kind(params: list) -> tuple[list, list]:
    return [p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]


def build_optimizer(params, cfg: OptimConfig, device: torch.device, fused: bool | None = None) -> AdamW:
    """AdamW, fused on CUDA (one kernel for all parameters of a kind; `fused` overrides the
    choice). Weight decay shrinks matrices (projections, embeddings) only, not the 1-D norm
    scales and biases, as Megatron-LM and transformers do: decaying a norm's scale pulls it
    towards 0, not towards its 1 at initialization. Without weight decay, one parameter group
    (as checkpoints before hold)."""
    params = list(params)
    groups = params if not cfg.weight_decay else [
        group for group in ({"params": [p for p in params if p.ndim >= 2]},
                            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}) if group["params"]]
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                 fused=device.type == "cuda" if fused is None else fused)


def build_scheduler(optimizer, total_steps: int, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))


def resume_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Load a saved schedule position and set the rates its own rule gives there: the
    optimizer's saved rates are the saved run's, whose total steps a resumed run may have
    changed (train.max_steps), and the first resumed step would use them otherwise. The base
    rates stay this run's, one per parameter group (the same lr: a resume cannot change it),
    as a checkpoint from before weight decay spared 1-D parameters holds one group's."""
    base_lrs = scheduler.base_lrs
    scheduler.load_state_dict(state)
    scheduler.base_lrs = base_lrs
    for group, base, rule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * rule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() tells
