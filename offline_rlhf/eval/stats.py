"""Summary statistics for evaluation tables (no torch)."""

from __future__ import annotations

import math
import random
import statistics
from typing import Callable, Sequence, TypeVar

Item = TypeVar("Item")


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n))."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def clustered_stderr(clusters: Sequence[Sequence[float]]) -> float:
    """Standard error of the mean over all values, clustered by question (the CR1 estimate:
    G/(G-1) * sum over questions of (their summed deviations)^2 / N^2); with one value per
    question it is the usual sample s.e., mean_and_stderr's."""
    values = [v for cluster in clusters for v in cluster]
    if len(clusters) < 2:
        return 0.0
    mean, groups = statistics.fmean(values), len(clusters)
    spread = sum(sum(v - mean for v in cluster) ** 2 for cluster in clusters)
    return math.sqrt(groups / (groups - 1) * spread) / len(values)


def _paired(scores: Sequence[float], baseline: Sequence[float]) -> None:
    if len(scores) != len(baseline):
        raise ValueError("a paired statistic needs one score per prompt for both models")


def paired_stderr(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Standard error of the mean difference scores - baseline over the same prompts: the
    prompt-to-prompt variance both models share cancels, unlike sqrt(se_a^2 + se_b^2)."""
    _paired(scores, baseline)
    return mean_and_stderr([a - b for a, b in zip(scores, baseline)])[1]


def win_tie_loss(scores: Sequence[float], baseline: Sequence[float]) -> tuple[float, float, float]:
    """Fractions of prompts where the model beats, ties and loses to the baseline."""
    _paired(scores, baseline)
    wins = sum(a > b for a, b in zip(scores, baseline))
    ties = sum(a == b for a, b in zip(scores, baseline))
    n = len(scores)
    return wins / n, ties / n, (n - wins - ties) / n


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of prompts where the model beats the baseline; ties count half."""
    wins, ties, _ = win_tie_loss(scores, baseline)
    return wins + ties / 2


def bootstrap_interval(items: Sequence[Item], statistic: Callable[[Sequence[Item]], float],
                       samples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over items resampled with replacement
    (seeded, so a table is reproducible). For paired statistics pass the pairs as items:
    `bootstrap_interval(list(zip(a, b)), lambda p: win_rate(*zip(*p)))`."""
    if not items:
        raise ValueError("a bootstrap interval needs at least one item")
    rng = random.Random(seed)
    values = sorted(statistic(rng.choices(items, k=len(items))) for _ in range(samples))
    tail = (1.0 - level) / 2
    return values[int(tail * (samples - 1))], values[math.ceil((1.0 - tail) * (samples - 1))]


def paired_win_rate_interval(scores: Sequence[float], baseline: Sequence[float],
                             samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of win_rate, resampling prompts (both models' scores together)."""
    _paired(scores, baseline)
    return bootstrap_interval(list(zip(scores, baseline)), lambda pairs: win_rate(*zip(*pairs)),
                              samples=samples, seed=seed)
