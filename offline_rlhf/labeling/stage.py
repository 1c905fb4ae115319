"""`orlhf label`: reward-label samples and z-score normalize the rewards (paper step 3).

Every sample (generated responses, human SFT responses, both sides of preference pairs)
gets `reward_raw` from the reward model and `reward = (reward_raw - mean) / std`, with the
mean and standard deviation of the labeled set itself (`normalization=labeled_set`) or the
ones `orlhf rm` stored from its validation responses (`normalization=rm_stats`). The choice
and the numbers go into `labels_meta.json`; `reward_histogram.png` shows both distributions.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from offline_rlhf.checkpoint import read_meta, resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.stages import LabelConfig
from offline_rlhf.fsutil import write_atomic, write_jsonl
from offline_rlhf.labeling.plots import reward_histogram
from offline_rlhf.labeling.samples import Sample, read_samples
from offline_rlhf.labeling.scoring import (REWARD_STATS, encode_responses, load_reward_model, reward_stats,
                                           score_sequences, scoring_setup)
from offline_rlhf.runtime import stage_runtime

STAGE = "label"
LABELED = "labeled.jsonl"
META = "labels_meta.json"


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
    return [{**{k: v for k, v in asdict(s).items() if v is not None}, "reward_raw": r, "reward": n}
            for s, r, n in zip(samples, raw, normalized)]


def main(cfg: LabelConfig) -> int:
    rm_path = resolve_checkpoint(cfg.rm, "rm")
    model_cfg = read_meta(rm_path).model
    with stage_runtime(STAGE, cfg.run_dir, cfg.parallel, model_cfg, cfg) as (rt, usage):
        model, tokenizer, metadata = load_reward_model(cfg.rm, rt, key="rm")
        template, max_len = scoring_setup(metadata, model_cfg)
        samples = [s for i in cfg.inputs
                   for s in read_samples(i.name or i.path, i.kind, i.format, i.path, template, i.max_samples, cfg.seed)]
        rt.log(f"label: scoring {len(samples)} samples with {rm_path}")
        sequences = encode_responses(tokenizer, template, [(s.prompt, s.response) for s in samples], max_len)
        raw = score_sequences(model, sequences, cfg.batch_size, rt, tokenizer.pad_id)
        stats = normalization_stats(cfg.normalization, raw, metadata, str(rm_path))
        normalized = normalize(raw, stats)
        usage.tokens = sum(map(len, sequences))
        if rt.is_main:
            write_jsonl(rt.stage_dir / LABELED, labeled_records(samples, raw, normalized))
            meta = {"reward_model": str(rm_path), "normalization": cfg.normalization, "stats": stats,
                    "samples": len(samples), "by_source": _counts(samples)}
            write_atomic(rt.stage_dir / META, json.dumps(meta, indent=2))
            reward_histogram(raw, normalized, [s.kind for s in samples], rt.stage_dir / "reward_histogram.png",
                             title=f"rewards of {len(samples)} samples ({cfg.normalization} normalization)")
            write_atomic(rt.stage_dir / "DONE", f"{rt.stage_dir / LABELED}\n")
            rt.log(f"label done: {rt.stage_dir / LABELED}; normalized with mean {stats['mean']:.4f}, "
                   f"std {stats['std']:.4f} ({cfg.normalization})")
    return 0


def _counts(samples: list[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sample in samples:
        key = f"{sample.source}:{sample.kind}"
        counts[key] = counts.get(key, 0) + 1
    return counts
