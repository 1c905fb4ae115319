"""Reward-model loss (paper Eq. 2, Bradley-Terry)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, normalizer: float,
                       margin: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 2: loss = -E[log sigmoid(r(x, y_w) - r(x, y_l) - margin)], margin 0 in the paper.

    chosen_rewards, rejected_rewards: [P], one reward per pair of this micro-batch.
    The sum over pairs is divided by `normalizer` = pairs in the whole global batch, so
    accumulation and data-parallel size leave the loss unchanged. `F.logsigmoid` stays
    finite for any difference (log(sigmoid(x)) underflows to log(0) below x ~ -100).
    Returns (loss, metric SUMS over these pairs): loss, accuracy (chosen strictly above
    rejected; a tie counts as wrong), chosen_reward, rejected_reward, margin (r_w - r_l).
    """
    difference = chosen_rewards - rejected_rewards
    nll = -F.logsigmoid(difference - margin)
    total = nll.sum()
    sums = {
        "loss": total,
        "accuracy": (difference > 0).sum(),
        "chosen_reward": chosen_rewards.sum(),
        "rejected_reward": rejected_rewards.sum(),
        "margin": difference.sum(),
    }
    return total / normalizer, {key: value.detach().float() for key, value in sums.items()}
