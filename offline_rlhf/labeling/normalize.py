"""Z-score normalization of raw rewards (paper step 3) and the labeled records."""

from __future__ import annotations

from dataclasses import asdict

from offline_rlhf.checkpoint import REWARD_STATS
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.data.records import TURNS, turns_field
from offline_rlhf.labeling.samples import Sample
from offline_rlhf.labeling.scoring import reward_stats


def normalization_stats(choice: str, raw: list[float], rm_metadata: dict, rm_path: str) -> dict:
    if choice == "labeled_set":
        return reward_stats(raw, "labeled set")
    if REWARD_STATS not in rm_metadata:
        raise ConfigError("normalization", f"rm_stats asked for, but the reward model {rm_path} stores no reward "
                          "statistics", "use normalization=labeled_set, or a checkpoint written by `orlhf rm`")
    return rm_metadata[REWARD_STATS]


def normalize(raw: list[float], stats: dict) -> list[float]:
    std = stats["std"] if stats["std"] > 0 else 1.0  # a constant reward model: shift only
    return [(value - stats["mean"]) / std for value in raw]


def labeled_records(samples: list[Sample], raw: list[float], normalized: list[float]) -> list[dict]:
    """labeled.jsonl's rows: the sample (a generated one's provenance keys as read), its rewards."""
    return [{**{k: v for k, v in asdict(s).items() if v is not None and k not in (TURNS, "origin")},
             **dict(s.origin), **turns_field(s.turns), "reward_raw": r, "reward": n}
            for s, r, n in zip(samples, raw, normalized)]


def counts_by_source(samples: list[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sample in samples:
        key = f"{sample.source}:{sample.kind}"
        counts[key] = counts.get(key, 0) + 1
    return counts
