"""Offline preference optimization from pairs: DPO (Rafailov et al. 2023, Eq. 7), its
conservative variant with label smoothing (cDPO, Mitchell 2023) and IPO (Azar et al.
2023, Eq. 17).

Each loss is a function of four [P] tensors, one value per pair: the summed response
log-probabilities of the chosen (w) and rejected (l) reply under the policy and under
the frozen reference model (computed offline, once, by `orlhf reference`). With
h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), the log-ratio margin:

    dpo:  -log sigmoid(beta h)
    cdpo: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing)
    ipo:  (h - 1 / (2 beta))^2

A pair is one unit: the sum over pairs is divided by `normalizer`, the number of pairs
in the global batch, so micro-batching, accumulation and data-parallel size leave the
loss unchanged. Returned metrics are SUMS over these pairs (the loop divides by the
global pair count): the implicit rewards beta * log(pi / ref) of each side, their
margin, and the reward accuracy (chosen strictly above rejected; a tie counts as wrong).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREFERENCE_METHODS = ("dpo", "ipo", "cdpo")


def _check(beta: float, label_smoothing: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> tuple[torch.Tensor, ...]:
    """(chosen log-ratio, rejected log-ratio, h), in float64: log-prob sums of long replies
    are hundreds of nats, and their differences must survive at the start of training,
    where the policy equals the reference and h is exactly 0."""
    chosen = policy_chosen.double() - ref_chosen.double()
    rejected = policy_rejected.double() - ref_rejected.double()
    return chosen, rejected, chosen - rejected


def preference_loss(method: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float, normalizer: float,
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`method`'s loss (see the module docstring) of [P] log-prob sums, divided by
    `normalizer`; `label_smoothing` applies to cdpo only (dpo is cdpo with eps = 0).
    `F.logsigmoid` keeps every beta finite (log(sigmoid(x)) underflows below x ~ -100)."""
    if method not in PREFERENCE_METHODS:
        raise ValueError(f"unknown preference method {method!r}; use one of {', '.join(PREFERENCE_METHODS)}")
    eps = label_smoothing if method == "cdpo" else 0.0
    _check(beta, eps)
    chosen, rejected, h = logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if method == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    total = losses.sum()
    chosen_reward, rejected_reward = beta * chosen, beta * rejected
    sums = {"loss": total, "reward_accuracy": (chosen_reward > rejected_reward).sum(),
            "chosen_reward": chosen_reward.sum(), "rejected_reward": rejected_reward.sum(),
            "reward_margin": (chosen_reward - rejected_reward).sum(),
            "count/pairs": torch.tensor(float(len(h)), device=h.device)}
    return (total / normalizer).float(), {key: value.detach().float() for key, value in sums.items()}
