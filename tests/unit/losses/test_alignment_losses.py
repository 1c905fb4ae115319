"""The offline alignment losses (Eqs. 4-6) against values computed by hand."""

import math

import torch
from pytest import approx

from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import IGNORE_INDEX
from offline_rlhf.losses.alignment import kept_by_filter, mle_filter_loss, rwr_loss, rwr_normalizer, rwr_weights
from offline_rlhf.losses.logprobs import shifted_token_nll
from offline_rlhf.losses.sft import sft_loss

# Two samples of three tokens over a two-word vocabulary. Position 0 is the prompt; the
# logits at t score the label at t + 1, so each sample trains on two tokens.
LOGITS = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [9.0, 9.0]],
                       [[1.0, 1.0], [0.0, 3.0], [9.0, 9.0]]])
LABELS = torch.tensor([[IGNORE_INDEX, 1, 0], [IGNORE_INDEX, 0, 1]])


def nll(logit_pair, target):
    return -(logit_pair[target] - math.log(math.exp(logit_pair[0]) + math.exp(logit_pair[1])))


TOKEN_NLL = shifted_token_nll(LOGITS, LABELS)  # (nll, mask), what the losses take
SAMPLE_NLL = [nll((0.0, 1.0), 1) + nll((2.0, 0.0), 0), nll((1.0, 1.0), 0) + nll((0.0, 3.0), 1)]


def test_sft_loss_by_hand():
    loss, metrics = sft_loss(*TOKEN_NLL, normalizer=4)
    assert loss.item() == approx(sum(SAMPLE_NLL) / 4)
    assert metrics["loss"].item() == approx(sum(SAMPLE_NLL))


def test_mle_filter_keeps_samples_above_threshold():
    loss, metrics = mle_filter_loss(*TOKEN_NLL, torch.tensor([0.7, -0.2]), threshold=0.0, normalizer=2)
    assert loss.item() == approx(SAMPLE_NLL[0] / 2)
    assert (metrics["count/kept"].item(), metrics["count/samples"].item(),
            metrics["count/kept_tokens"].item()) == (1, 2, 2)


def test_a_reward_equal_to_the_threshold_is_filtered_out():
    """Eq. 4 keeps R > t, strictly: a sample exactly at t is not trained on."""
    assert kept_by_filter(torch.tensor([0.5, 0.75, 0.25, -0.5]), 0.5).tolist() == [False, True, False, False]
    loss, metrics = mle_filter_loss(*TOKEN_NLL, torch.tensor([0.5, 0.75]), threshold=0.5, normalizer=2)
    assert loss.item() == approx(SAMPLE_NLL[1] / 2) and metrics["count/kept"].item() == 1


def test_mle_filter_all_filtered_is_zero_not_nan():
    loss, metrics = mle_filter_loss(*TOKEN_NLL, torch.tensor([-1.0, -0.5]), threshold=0.0, normalizer=1)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert metrics["count/kept"].item() == 0


def test_rwr_weights_by_hand():
    rewards = torch.tensor([1.0, -1.0])
    loss, metrics = rwr_loss(*TOKEN_NLL, rewards, beta=5.0, normalizer=4)
    weights = [math.exp(1 / 5), math.exp(-1 / 5)]
    assert loss.item() == approx((weights[0] * SAMPLE_NLL[0] + weights[1] * SAMPLE_NLL[1]) / 4)
    assert metrics["count/ess"].item() == approx(sum(weights) ** 2 / sum(w * w for w in weights))


def test_rwr_normalizer_counts_tokens_or_weighted_tokens():
    rewards = torch.tensor([1.0, -1.0])
    assert rwr_normalizer(LABELS, rewards, 5.0, normalize=False) == 4  # two trained tokens per sample
    weighted = rwr_normalizer(LABELS, rewards, 5.0, normalize=True)
    assert weighted == approx(2 * math.exp(1 / 5) + 2 * math.exp(-1 / 5))
    # Normalized RWR is then a weighted mean per token: equal rewards give plain SFT.
    equal = torch.tensor([0.3, 0.3])
    loss, _ = rwr_loss(*TOKEN_NLL, equal, 5.0, rwr_normalizer(LABELS, equal, 5.0, normalize=True))
    assert loss.item() == approx(sum(SAMPLE_NLL) / 4)


def test_rwr_large_rewards_do_not_overflow():
    huge = torch.tensor([5000.0, 4000.0, -3000.0])
    weights = rwr_weights(huge, beta=5.0)
    assert torch.isfinite(weights).all() and weights[0].item() == approx(math.exp(20.0), rel=1e-5)
    assert weights[2].item() == approx(math.exp(-600.0), abs=1e-30)
    labels = LABELS[:1].expand(3, -1)
    normalizer = rwr_normalizer(labels, huge, 5.0, normalize=True)
    loss, _ = rwr_loss(*shifted_token_nll(LOGITS[:1].expand(3, -1, -1), labels), huge, 5.0, normalizer)
    assert math.isfinite(normalizer) and torch.isfinite(loss)
    assert loss.item() == approx(SAMPLE_NLL[0] / 2, rel=1e-5)  # both clamped samples weigh the same


def test_reward_prompt_renders_one_decimal_after_the_assistant_tag():
    assert ChatTemplate().reward_prompt(4.96) == " <rm_score> 5.0"
    assert ChatTemplate().reward_prompt(-0.04) == " <rm_score> 0.0"  # one spelling of zero, not "-0.0"
    assert ChatTemplate(sep="\n").reward_prompt(1.25) == "\n<rm_score>\n1.2"
    assert ChatTemplate().prompt_text("hi") + ChatTemplate().reward_prompt(5) == "User: hi Assistant: <rm_score> 5.0"
