"""The PPO math of the baseline as pure functions of tensors (paper Sec. 2 and 5).

Every per-token tensor is [B, T] over one alignment chosen by the caller: position t holds
the log-prob, value and reward of the action token t, and `mask` [B, T] bool marks the
response tokens (prompt and padding are False). Whatever lies outside the mask is ignored.

The losses follow the project's convention (offline_rlhf/losses): they return
(loss SUM / normalizer, metric SUMS), with `normalizer` the number of response tokens in
the global batch (all micro-batches, all data-parallel ranks), so the train loop's Task
divides the metric sums by the same count.

Defaults are the paper's PPO settings (Sec. 5): KL coefficient 0.01, gamma 1, GAE lambda
0.95; the clip ranges 0.2 are the usual choice of Schulman et al. (2017).
"""

from __future__ import annotations

import torch

KL_COEF = 0.01
GAMMA = 1.0
LAMBDA = 0.95
CLIP = 0.2
VALUE_CLIP = 0.2


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, T] -> [B] index of the last True per row (0 where a row has none)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, 0).amax(dim=1)


def kl_penalized_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float = KL_COEF) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 with gamma_ptx = 0: r_t = -beta (log pi(x_t) - log pi_SFT(x_t)) per response
    token, plus the reward model's sequence score r_theta(x, y) at the last response token.
    The KL term is the k1 estimator log pi - log pi_ref, whose sum over the response is the
    sequence log-ratio of Eq. 3.
    logp, ref_logp, mask [B, T]; scores [B] -> (rewards [B, T], kl [B, T]), 0 outside mask."""
    mask = mask.bool()
    kl = torch.where(mask, logp - ref_logp, 0.0)
    rewards = -kl_coef * kl
    # A row without response tokens has no action to credit its score to.
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += torch.where(mask.any(dim=1), scores.to(rewards.dtype), 0.0)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = GAMMA,
        lam: float = LAMBDA) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2015, Eq. 16) over response tokens:
    delta_t = r_t + gamma V_{t'} - V_t with t' the next response token (V = 0 after the
    last one: the episode ends there), A_t = delta_t + gamma lam A_{t'}; returns = A + V.
    Positions outside the mask are skipped, not treated as steps, so left or right padding
    and the prompt leave the result unchanged.
    rewards, values, mask [B, T] -> (advantages [B, T], returns [B, T]), 0 outside mask."""
    mask = mask.bool()
    advantages = torch.zeros_like(values)
    running = values.new_zeros(values.shape[0])
    next_value = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(mask[:, t], delta + gamma * lam * running, running)
        next_value = torch.where(mask[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(mask[:, t], running, 0.0)
    return advantages, torch.where(mask, advantages + values, 0.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with the mean and (population) variance, in float64, of
    the masked entries of the rollout batch (the whole batch: every actor rank holds it).
    x, mask [B, T] -> [B, T] in x's dtype, 0 outside mask."""
    mask = mask.bool()
    count = mask.sum().double()
    values = torch.where(mask, x.double(), 0.0)
    mean = values.sum() / count
    var = (values.pow(2).sum() / count - mean.pow(2)).clamp(min=0.0)
    whitened = ((x.double() - mean) * torch.rsqrt(var + eps)).to(x.dtype)
    return torch.where(mask, whitened, 0.0)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                normalizer: float, clip: float = CLIP,
                entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss to minimize:
    max(-A r, -A clip(r, 1 - eps, 1 + eps)) per response token with r = pi / pi_old.
    Metric sums: the loss, approx_kl (the k3 estimator (r - 1) - log r of KL(old || new),
    never negative), clip_frac (tokens where the clipped term is the one taken) and, when
    the caller passes per-token entropy, entropy.
    logp, old_logp, advantages, mask [B, T]; entropy [B, T] or None."""
    # Mask the inputs, not only the result: a NaN or inf outside the response (padding)
    # would otherwise turn the zero gradient of a masked token into NaN.
    mask = mask.bool()
    log_ratio = torch.where(mask, logp - old_logp, 0.0)
    advantages = torch.where(mask, advantages, 0.0)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    total = torch.maximum(unclipped, clipped).sum()
    metrics = {"loss": total.detach(),
               "approx_kl": torch.where(mask, (ratio - 1.0) - log_ratio, 0.0).sum().detach(),
               "clip_frac": (mask & (clipped > unclipped)).sum().to(total.dtype)}
    if entropy is not None:
        metrics["entropy"] = torch.where(mask, entropy, 0.0).sum().detach()
    return total / normalizer, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               normalizer: float, clip: float = VALUE_CLIP) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) per
    response token, so one update cannot move a value more than eps from the rollout's.
    Metric sums: the loss and value_clip_frac (tokens where the clipped error is larger).
    values, old_values, returns, mask [B, T]."""
    # Masked before squaring, as in policy_loss, so padding cannot put NaN in a gradient.
    mask = mask.bool()
    step = torch.where(mask, values - old_values, 0.0).clamp(-clip, clip)
    error = torch.where(mask, values - returns, 0.0).pow(2)
    clipped_error = torch.where(mask, old_values + step - returns, 0.0).pow(2)
    total = 0.5 * torch.maximum(error, clipped_error).sum()
    metrics = {"loss": total.detach(),
               "value_clip_frac": (mask & (clipped_error > error)).sum().to(total.dtype)}
    return total / normalizer, metrics


def masked_variance(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x, mask [B, T] -> scalar float64 population variance of the masked entries. Two
    passes (mean, then squared deviations), exact enough to tell a constant from noise."""
    mask = mask.bool()
    count = mask.sum()
    mean = torch.where(mask, x.double(), 0.0).sum() / count
    return torch.where(mask, (x.double() - mean).pow(2), 0.0).sum() / count


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over response tokens: 1 is a perfect critic, 0 one no better
    than a constant, negative worse; NaN when the returns do not vary (undefined).
    values, returns, mask [B, T] -> scalar float64."""
    spread = masked_variance(returns, mask)
    ratio = masked_variance(returns - values, mask) / spread
    return torch.where(spread > 0, 1.0 - ratio, torch.nan)
