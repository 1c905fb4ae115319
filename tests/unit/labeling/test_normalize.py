"""Reward statistics and the z-score (paper step 3) against values computed by hand."""

import pytest

from offline_rlhf.labeling.normalize import normalization_stats, normalize
from offline_rlhf.labeling.scoring import reward_stats


def test_reward_stats_use_the_population_standard_deviation():
    # mean 5; squared deviations 9, 1, 1, 1, 0, 0, 4, 16 sum to 32: population variance
    # 32 / 8 = 4, std 2 (the sample std, sqrt(32 / 7), would be 2.138...).
    stats = reward_stats([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0], "labeled set")
    assert stats == {"mean": 5.0, "std": 2.0, "count": 8, "source": "labeled set"}
    assert normalization_stats("labeled_set", [1.0, 3.0], {}, "rm") == {"mean": 2.0, "std": 1.0, "count": 2,
                                                                         "source": "labeled set"}


def test_normalize_is_a_z_score():
    assert normalize([1.0, 5.0, 9.0, 4.0], {"mean": 5.0, "std": 2.0}) == [-2.0, 0.0, 2.0, -0.5]


@pytest.mark.parametrize("raw, expected", [([3.0, 3.0], [0.0, 0.0]), ([3.0, 4.5, 1.0], [0.0, 1.5, -2.0])])
def test_a_constant_reward_model_is_shifted_only(raw, expected):
    """A reward model that gave every sample of its statistics the same score (std 0): the
    rewards are shifted by its mean and not scaled, neither divided by 0 nor blown up."""
    assert normalize(raw, {"mean": 3.0, "std": 0.0}) == expected
    assert normalize(raw, reward_stats([3.0, 3.0, 3.0], "rm")) == expected
