"""`orlhf label`: reward-label samples and z-score normalize the rewards (paper step 3).

Every sample (generated responses, human SFT responses, both sides of preference pairs)
gets `reward_raw` from the reward model and `reward = (reward_raw - mean) / std`, with the
mean and standard deviation of the labeled set itself (`normalization=labeled_set`) or the
ones `orlhf rm` stored from its validation responses (`normalization=rm_stats`). The choice
and the numbers go into `labels_meta.json`; `reward_histogram.png` shows both distributions.
"""

from __future__ import annotations

import json

from offline_rlhf.checkpoint import read_meta, resolve_checkpoint
from offline_rlhf.config.samples import LabelConfig
from offline_rlhf.fsutil import write_atomic, write_jsonl
from offline_rlhf.labeling.normalize import counts_by_source, labeled_records, normalization_stats, normalize
from offline_rlhf.labeling.plots import reward_histogram
from offline_rlhf.labeling.samples import read_samples
from offline_rlhf.labeling.scoring import encode_responses, load_reward_model, score_sequences, scoring_setup
from offline_rlhf.runtime import stage_runtime
from offline_rlhf.stage_support import mark_done

STAGE = "label"
LABELED = "labeled.jsonl"
META = "labels_meta.json"


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
                    "samples": len(samples), "by_source": counts_by_source(samples)}
            write_atomic(rt.stage_dir / META, json.dumps(meta, indent=2))
            reward_histogram(raw, normalized, [s.kind for s in samples], rt.stage_dir / "reward_histogram.png",
                             title=f"rewards of {len(samples)} samples ({cfg.normalization} normalization)")
            mark_done(rt, rt.stage_dir / LABELED)
            rt.log(f"label done: {rt.stage_dir / LABELED}; normalized with mean {stats['mean']:.4f}, "
                   f"std {stats['std']:.4f} ({cfg.normalization})")
    return 0
