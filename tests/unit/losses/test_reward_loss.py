"""bradley_terry_loss (Eq. 2) against values computed by hand."""

import math

import torch

from offline_rlhf.losses.reward import bradley_terry_loss


def neg_log_sigmoid(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


CHOSEN, REJECTED = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0])


def test_loss_and_metric_sums_by_hand():
    loss, sums = bradley_terry_loss(CHOSEN, REJECTED, normalizer=2)
    expected = (neg_log_sigmoid(1.5) + neg_log_sigmoid(-1.0)) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(sums["loss"].item(), 2 * expected, rel_tol=1e-6)  # a sum; the loop divides it
    assert sums["accuracy"].item() == 1.0  # 1 of 2 pairs: accuracy 0.5 after the loop divides by 2
    assert sums["chosen_reward"].item() == 1.0 and sums["rejected_reward"].item() == 0.5
    assert sums["margin"].item() == 0.5  # (2 - 0.5) + (-1 - 0)


def test_loss_is_divided_by_the_global_normalizer_not_the_local_count():
    local, _ = bradley_terry_loss(CHOSEN, REJECTED, normalizer=8)
    whole, _ = bradley_terry_loss(CHOSEN, REJECTED, normalizer=2)
    assert math.isclose(local.item() * 4, whole.item(), rel_tol=1e-6)


def test_margin_is_subtracted_inside_the_sigmoid():
    loss, sums = bradley_terry_loss(CHOSEN, REJECTED, normalizer=2, margin=1.0)
    expected = (neg_log_sigmoid(0.5) + neg_log_sigmoid(-2.0)) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert sums["accuracy"].item() == 1.0  # accuracy ranks rewards; the margin does not move it


def test_ties_count_as_wrong():
    _, sums = bradley_terry_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0]), normalizer=2)
    assert sums["accuracy"].item() == 1.0


def test_large_differences_give_finite_loss_and_gradient():
    chosen = torch.tensor([-500.0, 500.0, 1e4], requires_grad=True)
    loss, sums = bradley_terry_loss(chosen, torch.tensor([500.0, -500.0, -1e4]), normalizer=3)
    loss.backward()
    assert math.isclose(loss.item(), 1000.0 / 3, rel_tol=1e-6)  # -log sigmoid(-1000) = 1000 (+ e^-1000)
    assert torch.isfinite(chosen.grad).all()
    assert torch.allclose(chosen.grad, torch.tensor([-1 / 3, 0.0, 0.0]))
    assert sums["accuracy"].item() == 2.0
