"""Reward-distribution histograms (the paper's Figure 5), drawn without a display."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def reward_histogram(raw: list[float], normalized: list[float], groups: list[str], path: str | Path,
                     title: str = "") -> Path:
    """Raw and normalized rewards side by side, one histogram per group (generated, sft...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, values, label in ((axes[0], raw, "raw reward"), (axes[1], normalized, "normalized reward (z-score)")):
        by_group = defaultdict(list)
        for group, value in zip(groups, values):
            by_group[group].append(value)
        bins = 40
        for group, group_values in sorted(by_group.items()):
            axis.hist(group_values, bins=bins, alpha=0.55, label=f"{group} ({len(group_values)})")
        axis.set_xlabel(label)
        axis.set_ylabel("samples")
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
