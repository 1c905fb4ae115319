"""Summary statistics for evaluation tables (no torch)."""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n))."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of prompts where the model beats the baseline; ties count half."""
    if len(scores) != len(baseline):
        raise ValueError("win rate needs one score per prompt for both models")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline)) / len(scores)
