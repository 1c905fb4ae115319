"""DPO, cDPO and IPO against values computed by hand from the papers' formulas."""

import math

import pytest
import torch

from offline_rlhf.losses.preference import preference_loss

# Two pairs: (policy chosen, policy rejected, reference chosen, reference rejected).
# Pair 1: log-ratios +1 (chosen) and -1 (rejected), h = 2. Pair 2: 0 and +1, h = -1.
POLICY_CHOSEN, POLICY_REJECTED = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
REF_CHOSEN, REF_REJECTED = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])


def softplus(x):
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def loss_of(method, beta, normalizer=2.0, label_smoothing=0.0, policy=(POLICY_CHOSEN, POLICY_REJECTED)):
    return preference_loss(method, *policy, REF_CHOSEN, REF_REJECTED, beta, normalizer, label_smoothing)


def test_dpo_by_hand():
    loss, sums = loss_of("dpo", beta=0.1)
    expected = (softplus(-0.2) + softplus(0.1)) / 2  # -log sigmoid(beta h) for h = 2 and h = -1
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert sums["loss"].item() == pytest.approx(2 * expected, abs=1e-6)
    assert sums["chosen_reward"].item() == pytest.approx(0.1 * (1 + 0), abs=1e-6)
    assert sums["rejected_reward"].item() == pytest.approx(0.1 * (-1 + 1), abs=1e-6)
    assert sums["reward_margin"].item() == pytest.approx(0.1 * (2 - 1), abs=1e-6)
    assert sums["reward_accuracy"].item() == 1.0  # only the first pair ranks chosen above rejected
    assert sums["count/pairs"].item() == 2.0


def test_normalizer_is_the_global_pair_count():
    half, _ = loss_of("dpo", beta=0.1, normalizer=4.0)  # these 2 pairs of a global batch of 4
    whole, _ = loss_of("dpo", beta=0.1, normalizer=2.0)
    assert half.item() == pytest.approx(whole.item() / 2, abs=1e-7)


def test_cdpo_label_smoothing_by_hand():
    loss, _ = loss_of("cdpo", beta=0.1, label_smoothing=0.25)
    pair1 = 0.75 * softplus(-0.2) + 0.25 * softplus(0.2)
    pair2 = 0.75 * softplus(0.1) + 0.25 * softplus(-0.1)
    assert loss.item() == pytest.approx((pair1 + pair2) / 2, abs=1e-6)
    assert loss_of("cdpo", 0.1, label_smoothing=0.0)[0].item() == pytest.approx(loss_of("dpo", 0.1)[0].item())
    # dpo ignores label smoothing: it is cdpo's own parameter
    assert loss_of("dpo", 0.1, label_smoothing=0.25)[0].item() == pytest.approx(loss_of("dpo", 0.1)[0].item())


def test_ipo_by_hand():
    loss, sums = loss_of("ipo", beta=0.1)  # target margin 1 / (2 beta) = 5
    assert loss.item() == pytest.approx(((2 - 5) ** 2 + (-1 - 5) ** 2) / 2, abs=1e-5)
    assert sums["reward_margin"].item() == pytest.approx(0.1, abs=1e-6)
    big_beta, _ = loss_of("ipo", beta=1e6)  # target -> 0: the loss is h^2
    assert big_beta.item() == pytest.approx((4 + 1) / 2, abs=1e-4)


def test_dpo_gradient_by_hand():
    """d/d log pi(y_w) of -log sigmoid(beta h) = -beta sigmoid(-beta h), per pair / normalizer."""
    chosen = POLICY_CHOSEN.clone().requires_grad_()
    loss, _ = loss_of("dpo", beta=0.5, policy=(chosen, POLICY_REJECTED))
    loss.backward()
    expected = [-0.5 / (1 + math.exp(0.5 * h)) / 2 for h in (2.0, -1.0)]
    assert chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("method", ["dpo", "cdpo", "ipo"])
def test_policy_equal_to_reference(method):
    """At the start of training (policy = reference) h = 0: DPO and cDPO give log 2 for any
    beta, IPO gives (1/(2 beta))^2; rewards are 0 and a tie is not a correct ranking."""
    for beta in (1e-6, 0.1, 50.0):
        loss, sums = preference_loss(method, REF_CHOSEN, REF_REJECTED, REF_CHOSEN, REF_REJECTED, beta, 2.0, 0.1)
        expected = (1 / (2 * beta)) ** 2 if method == "ipo" else math.log(2)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        assert sums["reward_accuracy"].item() == 0.0 and sums["reward_margin"].item() == 0.0


def test_beta_edge_cases_stay_finite():
    """A huge beta with a wrong ranking: -log sigmoid(-beta) ~ beta, not inf; a tiny beta: log 2."""
    policy = (torch.tensor([-5.0], requires_grad=True), torch.tensor([-4.0]))
    loss, _ = preference_loss("dpo", *policy, torch.tensor([-5.0]), torch.tensor([-5.0]), 1e4, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(1e4, rel=1e-6)
    assert policy[0].grad.item() == pytest.approx(-1e4, rel=1e-6)  # sigmoid(-beta h) = 1: the full slope
    tiny, _ = preference_loss("dpo", *policy, torch.tensor([-5.0]), torch.tensor([-5.0]), 1e-9, 1.0)
    assert tiny.item() == pytest.approx(math.log(2), abs=1e-6)


def test_small_log_ratios_of_long_replies_survive():
    """Log-prob sums of long replies are large; a 1e-4 nat difference of float64 sums (the
    stored reference values) must still count: the loss does not round them to float32."""
    sums_of = [torch.tensor([value], dtype=torch.float64) for value in (-30000.0001, -30000.0, -30000.0, -30000.0)]
    _, sums = preference_loss("dpo", *sums_of, 1.0, 1.0)
    assert sums["chosen_reward"].item() == pytest.approx(-1e-4, rel=0.05)


@pytest.mark.parametrize("method,beta,smoothing,message", [
    ("dpo", 0.0, 0.0, "beta must be > 0"), ("ipo", -1.0, 0.0, "beta must be > 0"),
    ("dpo", float("nan"), 0.0, "beta must be > 0"), ("cdpo", 0.1, 0.5, "label_smoothing"),
    ("cdpo", 0.1, -0.1, "label_smoothing"), ("kto", 0.1, 0.0, "unknown preference method")])
def test_bad_parameters_are_refused(method, beta, smoothing, message):
    with pytest.raises(ValueError, match=message):
        loss_of(method, beta, label_smoothing=smoothing)
