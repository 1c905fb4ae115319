import math

import pytest

from offline_rlhf.eval.stats import (
    bootstrap_interval,
    mean_and_stderr,
    paired_stderr,
    paired_win_rate_interval,
    win_rate,
    win_tie_loss,
)


def test_mean_and_stderr_by_hand():
    mean, se = mean_and_stderr([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    assert se == pytest.approx(math.sqrt(((4 + 1 + 0 + 9) / 3) / 4))


def test_paired_stderr_cancels_shared_prompt_variance():
    baseline = [0.0, 10.0, 20.0, 30.0]
    scores = [1.0, 11.0, 21.5, 30.5]  # differences 1, 1, 1.5, 0.5
    assert paired_stderr(scores, baseline) == pytest.approx(mean_and_stderr([1, 1, 1.5, 0.5])[1])
    unpaired = math.hypot(mean_and_stderr(scores)[1], mean_and_stderr(baseline)[1])
    assert paired_stderr(scores, baseline) < unpaired / 10


def test_win_tie_loss_and_win_rate():
    assert win_tie_loss([3, 1, 2, 5], [1, 1, 4, 0]) == (0.5, 0.25, 0.25)
    assert win_rate([3, 1, 2, 5], [1, 1, 4, 0]) == 0.625
    with pytest.raises(ValueError, match="one score per prompt"):
        win_rate([1, 2], [1])


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    values = [float(v % 7) for v in range(200)]
    low, high = bootstrap_interval(values, lambda xs: sum(xs) / len(xs), seed=3)
    assert (low, high) == bootstrap_interval(values, lambda xs: sum(xs) / len(xs), seed=3)
    mean = sum(values) / len(values)
    assert low < mean < high
    assert high - low < 1.0
    assert bootstrap_interval([2.0] * 5, lambda xs: sum(xs) / len(xs)) == (2.0, 2.0)
    with pytest.raises(ValueError):
        bootstrap_interval([], len)


def test_paired_win_rate_interval_resamples_pairs():
    scores, baseline = [1.0] * 30 + [0.0] * 10, [0.0] * 30 + [1.0] * 10
    low, high = paired_win_rate_interval(scores, baseline)
    assert low <= 0.75 <= high and 0.55 < low and high < 0.9
