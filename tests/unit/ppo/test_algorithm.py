"""The PPO math against values computed by hand."""

import math

import torch
from pytest import approx

from ppo_baseline.algorithm import (
    explained_variance,
    gae,
    kl_penalized_rewards,
    policy_loss,
    value_loss,
    whiten,
)


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-6)


def test_kl_penalty_and_score_at_the_last_response_token():
    # Row 0: a prompt token, then three response tokens; row 1: two response tokens, then
    # padding; row 2: no response at all, so its score goes nowhere.
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    logp = torch.tensor([[-1.0, -0.5, -1.0, -2.0], [-1.0, -1.0, -9.0, -9.0], [-1.0] * 4])
    ref = torch.tensor([[-3.0, -1.0, -0.5, -2.5], [-1.5, -0.8, 0.0, 0.0], [0.0] * 4])
    rewards, kl = kl_penalized_rewards(logp, ref, torch.tensor([2.0, -1.0, 5.0]), mask, kl_coef=0.1)
    # kl = logp - ref on response tokens: [0.5, -0.5, 0.5] and [0.5, -0.2].
    close(kl, [[0, 0.5, -0.5, 0.5], [0.5, -0.2, 0, 0], [0] * 4])
    close(rewards[0], [0, -0.05, 0.05, -0.05 + 2.0])
    close(rewards[1], [-0.05, 0.02 - 1.0, 0, 0])
    assert rewards[2].tolist() == [0.0] * 4


def test_kl_coefficient_defaults_to_the_papers():
    mask = torch.ones(1, 1, dtype=torch.bool)
    rewards, _ = kl_penalized_rewards(torch.tensor([[0.0]]), torch.tensor([[-1.0]]), torch.tensor([0.0]), mask)
    assert rewards.item() == approx(-0.01)


# Four response tokens, gamma 1, lambda 0.95, by hand (A_t = delta_t + 0.95 A_{t+1}):
#   delta_3 = 1.0 + 0 - 0.2 = 0.8            A_3 = 0.8
#   delta_2 = -0.1 + 0.2 - 0.3 = -0.2        A_2 = -0.2 + 0.95 * 0.8 = 0.56
#   delta_1 = 0.0 + 0.3 - 0.4 = -0.1         A_1 = -0.1 + 0.95 * 0.56 = 0.432
#   delta_0 = 0.1 + 0.4 - 0.5 = 0.0          A_0 = 0.95 * 0.432 = 0.4104
REWARDS = [0.1, 0.0, -0.1, 1.0]
VALUES = [0.5, 0.4, 0.3, 0.2]
ADVANTAGES = [0.4104, 0.432, 0.56, 0.8]
RETURNS = [0.9104, 0.832, 0.86, 1.0]


def test_gae_four_tokens_by_hand():
    advantages, returns = gae(torch.tensor([REWARDS]), torch.tensor([VALUES]), torch.ones(1, 4, dtype=torch.bool))
    close(advantages[0], ADVANTAGES)
    close(returns[0], RETURNS)


def test_gae_skips_prompt_and_padding_whatever_they_hold():
    # The same episode behind two prompt tokens and before two padding tokens, which hold
    # values and rewards that must not leak in.
    rewards = torch.tensor([[7.0, 7.0, *REWARDS, 7.0, 7.0]])
    values = torch.tensor([[9.0, 9.0, *VALUES, 9.0, 9.0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    advantages, returns = gae(rewards, values, mask)
    close(advantages[0], [0, 0, *ADVANTAGES, 0, 0])
    close(returns[0], [0, 0, *RETURNS, 0, 0])


def test_gae_with_lambda_one_is_reward_to_go_minus_value():
    advantages, returns = gae(torch.tensor([REWARDS]), torch.tensor([VALUES]), torch.ones(1, 4, dtype=torch.bool),
                              gamma=1.0, lam=1.0)
    close(returns[0], [1.0, 0.9, 0.9, 1.0])
    close(advantages[0], [0.5, 0.5, 0.6, 0.8])


def test_gae_discounts_by_gamma_and_gamma_lambda_by_hand():
    # gamma 0.5 and lambda 0.5 (gamma * lambda = 0.25, not lambda), so both discounts show;
    # outside the mask, 7s and 9s that must not leak in. Row 0: a prompt token, three
    # response tokens, one padding token; row 1: two response tokens, three padding tokens.
    # delta_t = r_t + 0.5 V_{t'} - V_t, A_t = delta_t + 0.25 A_{t'} (V, A = 0 after the last):
    #   row 0: delta_3 = 1.0 + 0 - 0.5 = 0.5              A_3 = 0.5
    #          delta_2 = 0.0 + 0.5 * 0.5 - 0.25 = 0.0     A_2 = 0.0 + 0.25 * 0.5 = 0.125
    #          delta_1 = 0.0 + 0.5 * 0.25 - 0.5 = -0.375  A_1 = -0.375 + 0.25 * 0.125 = -0.34375
    #   row 1: delta_1 = 2.0 + 0 - 1.5 = 0.5              A_1 = 0.5
    #          delta_0 = 0.5 + 0.5 * 1.5 - 1.0 = 0.25     A_0 = 0.25 + 0.25 * 0.5 = 0.375
    # returns = A + V.
    rewards = torch.tensor([[7.0, 0.0, 0.0, 1.0, 7.0], [0.5, 2.0, 7.0, 7.0, 7.0]])
    values = torch.tensor([[9.0, 0.5, 0.25, 0.5, 9.0], [1.0, 1.5, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    close(advantages, [[0, -0.34375, 0.125, 0.5, 0], [0.375, 0.5, 0, 0, 0]])
    close(returns, [[0, 0.15625, 0.375, 1.0, 0], [1.375, 2.0, 0, 0, 0]])


def test_whiten_uses_response_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    # mean 2, population variance 2/3 over the three response tokens.
    expected = [-1 / math.sqrt(2 / 3), 0.0, 1 / math.sqrt(2 / 3), 0.0]
    close(whiten(x, mask)[0], expected)


# Policy loss, clip 0.2, one row of five tokens, the last one masked out:
#   t0: A = 1,  r = 1.5 -> max(-1.5, -1.2) = -1.2  clipped at the upper edge, no gradient
#   t1: A = -1, r = 0.5 -> max(0.5, 0.8)   = 0.8   clipped at the lower edge, no gradient
#   t2: A = 2,  r = 0.5 -> max(-1.0, -1.6) = -1.0  unclipped: d/dlogp = -A r = -1.0
#   t3: A = -2, r = 1.5 -> max(3.0, 2.4)   = 3.0   unclipped: d/dlogp = -A r = 3.0
# Sum 1.6, normalizer 8 -> 0.2.
RATIOS = torch.tensor([[1.5, 0.5, 0.5, 1.5, 3.0]])
POLICY_ADVANTAGES = torch.tensor([[1.0, -1.0, 2.0, -2.0, 100.0]])
MASK5 = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)


def test_policy_loss_both_clip_edges_by_hand():
    old_logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    logp = (old_logp + RATIOS.log()).requires_grad_()
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4, 9.0]])
    loss, metrics = policy_loss(logp, old_logp, POLICY_ADVANTAGES, MASK5, normalizer=8, entropy=entropy)
    assert loss.item() == approx(0.2)
    loss.backward()
    close(logp.grad[0], [0.0, 0.0, -1.0 / 8, 3.0 / 8, 0.0])
    assert metrics["loss"].item() == approx(1.6)
    assert metrics["clip_frac"].item() == 2
    assert metrics["approx_kl"].item() == approx(2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5)))
    assert metrics["entropy"].item() == approx(1.0)


def test_policy_loss_is_invariant_to_micro_batching():
    logp, old_logp, advantages = torch.randn(3, 4, 5).unbind(0)
    mask = torch.rand(4, 5) > 0.3
    whole, _ = policy_loss(logp, old_logp, advantages, mask, normalizer=mask.sum().item())
    parts = [policy_loss(logp[i:i + 2], old_logp[i:i + 2], advantages[i:i + 2], mask[i:i + 2],
                         normalizer=mask.sum().item())[0] for i in (0, 2)]
    assert sum(parts).item() == approx(whole.item())


# Value loss, clip 0.2, 0.5 * max(unclipped, clipped) squared error:
#   t0: old 1, new 1.5, R 2   -> (1.5-2)^2 = 0.25 vs (1.2-2)^2 = 0.64 -> 0.64 clipped, no gradient
#   t1: old 1, new 1.5, R 1   -> 0.25 vs (1.2-1)^2 = 0.04            -> 0.25 d/dV = (1.5-1) = 0.5
#   t2: old 0, new -.5, R .5  -> 1.0 vs (-0.2-0.5)^2 = 0.49          -> 1.0  d/dV = (-0.5-0.5) = -1.0
#   t3: old 0, new -.5, R -1  -> 0.25 vs (-0.2+1)^2 = 0.64           -> 0.64 clipped, no gradient
# Sum 0.5 * 2.53 = 1.265, normalizer 4 -> 0.31625.
def test_value_loss_by_hand():
    old = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[1.5, 1.5, -0.5, -0.5, 50.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 1.0, 0.5, -1.0, -50.0]])
    loss, metrics = value_loss(values, old, returns, MASK5, normalizer=4)
    assert loss.item() == approx(0.31625)
    loss.backward()
    close(values.grad[0], [0.0, 0.5 / 4, -1.0 / 4, 0.0, 0.0])
    assert metrics["loss"].item() == approx(1.265)
    assert metrics["value_clip_frac"].item() == 2


def test_losses_ignore_nan_and_inf_outside_the_mask():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    garbage = torch.tensor([[0.0, 0.0, float("nan")]])
    logp = torch.tensor([[-1.0, -2.0, float("-inf")]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.tensor([[-1.0, -1.0, 0.0]]), garbage + 1.0, mask, normalizer=2)
    values = torch.tensor([[0.5, 0.5, float("inf")]], requires_grad=True)
    value, _ = value_loss(values, garbage, garbage, mask, normalizer=2)
    (loss + value).backward()
    assert torch.isfinite(loss + value)
    assert logp.grad[0, 2] == 0 and values.grad[0, 2] == 0
    assert torch.isfinite(logp.grad).all() and torch.isfinite(values.grad).all()


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert explained_variance(returns, returns, mask).item() == approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.0), returns, mask).item() == approx(0.0)
    # R - V = [0, 0, 3]: variance 2 against Var[R] = 2/3.
    assert explained_variance(torch.tensor([[1.0, 2.0, 0.0, 0.0]]), returns, mask).item() == approx(-2.0)
    assert math.isnan(explained_variance(returns, torch.ones(1, 4), mask).item())
