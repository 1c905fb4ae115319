"""Offline alignment losses of the paper (Sec. 3.2): MLE with filtering (Eq. 4),
reward-weighted regression (Eq. 5); Decision-Transformer alignment (Eq. 6) is the SFT loss
on samples whose prompt carries the reward (`ChatTemplate.reward_prompt`).

All take per-token NLL and its mask from `token_nll` (labels cover the response only) and
a normalized reward R per sample, and return (loss, metric sums). Loss sums are divided by
`normalizer`, the number of trained response tokens in the global batch. Metrics whose
name starts with `count/` are global counts, not averages (see Task.derive).
"""

from __future__ import annotations

import torch

from offline_rlhf.data.tokenize import IGNORE_INDEX


def per_sample_nll(nll: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nll, mask [B, T-1] -> (sum of response-token NLL per sample [B], response tokens per sample [B])."""
    return (nll * mask).sum(dim=1), mask.sum(dim=1)


def kept_by_filter(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eq. 4's indicator: a sample is trained on when its normalized reward exceeds t."""
    return rewards > threshold


def mle_filter_loss(nll, mask, rewards, threshold: float, normalizer: float) -> tuple[torch.Tensor, dict]:
    """Eq. 4: L = -sum_{R(p,x) > t} sum_i log p(x_i | x_<i, p). `normalizer` counts the
    response tokens of KEPT samples only, so a batch where nothing passes gives 0, not NaN."""
    sample_nll, sample_tokens = per_sample_nll(nll, mask)
    kept = kept_by_filter(rewards, threshold)
    total = (sample_nll * kept).sum()
    return total / normalizer, {"loss": total.detach(), "count/kept": kept.sum().float(),
                                "count/samples": torch.tensor(float(len(rewards)), device=rewards.device),
                                "count/kept_tokens": (sample_tokens * kept).sum().float()}


MAX_LOG_WEIGHT = 20.0  # RWR's log-weight clamp: exp(20) ~ 5e8


def rwr_weights(rewards: torch.Tensor, beta: float, max_log_weight: float = MAX_LOG_WEIGHT) -> torch.Tensor:
    """Eq. 5's exp(R / beta), with log-weights clamped at `max_log_weight` (exp(20) ~ 5e8) so
    no weight overflows; normalized rewards are z-scores, far below the clamp."""
    return torch.exp((rewards.double() / beta).clamp(max=max_log_weight)).float()


def rwr_normalizer(labels: torch.Tensor, rewards: torch.Tensor, beta: float, normalize: bool) -> float:
    """What the loop divides the RWR loss of a micro-batch by (summed over the global batch):
    response tokens, or with `normalize` the weighted tokens sum_i w_i n_i, which makes the
    loss a weighted mean per token whatever the micro-batch and data-parallel sizes."""
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).double()
    return float((rwr_weights(rewards, beta).double() * tokens).sum() if normalize else tokens.sum())


def rwr_loss(nll, mask, rewards, beta: float, normalizer: float) -> tuple[torch.Tensor, dict]:
    """Eq. 5: L = -sum exp(R(p,x) / beta) sum_i log p(x_i | x_<i, p), divided by
    `normalizer` (see rwr_normalizer). Reports the effective sample size (sum w)^2 / sum w^2
    of these samples, and sum w and sum w^2, from whose global sums a Task derives the ESS
    of the global batch."""
    sample_nll, _ = per_sample_nll(nll, mask)
    weights = rwr_weights(rewards, beta).to(sample_nll.dtype)
    total = (weights * sample_nll).sum()
    ess = weights.sum() ** 2 / (weights.pow(2).sum() + 1e-12)
    return total / normalizer, {"loss": total.detach(), "count/ess": ess.detach(),
                                "count/samples": torch.tensor(float(len(rewards)), device=rewards.device),
                                "count/weight_sum": weights.sum().detach(),
                                "count/weight_sq_sum": weights.pow(2).sum().detach()}
