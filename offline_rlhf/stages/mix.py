"""`orlhf mix`: the reward-labeled alignment dataset `run_dir/mix/alignment.jsonl`, with
its card."""

from __future__ import annotations

import json

from offline_rlhf.config.samples import MixConfig
from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.fsutil import write_atomic, write_jsonl
from offline_rlhf.labeling.mix import card, card_markdown, draw, read_labeled_records, repetition_notes
from offline_rlhf.runtime import stage_runtime
from offline_rlhf.stage_support import mark_done

STAGE = "mix"
ALIGNMENT = "alignment.jsonl"


def main(cfg: MixConfig) -> int:
    """Selection and bookkeeping only: one process, no model (its ledger row is tiny)."""
    with stage_runtime(STAGE, cfg.run_dir, ParallelConfig(), None, cfg) as (rt, usage):
        records = read_labeled_records(cfg.input)
        mixed, stats = draw(cfg, records)
        summary = card(mixed, stats, cfg)
        write_jsonl(rt.stage_dir / ALIGNMENT, mixed)
        write_atomic(rt.stage_dir / "dataset_card.json", json.dumps(summary, indent=2))
        write_atomic(rt.stage_dir / "dataset_card.md", card_markdown(summary))
        mark_done(rt, rt.stage_dir / ALIGNMENT)
        groups = ", ".join(f"{g} {s['taken']}" + (" pairs" if g == "preference" else "") for g, s in stats.items())
        rt.log(f"mix done: {len(mixed)} samples ({groups}) in {rt.stage_dir / ALIGNMENT}")
        for note in repetition_notes(stats):
            rt.log(note)
        for group in (g for g, s in stats.items() if s.get("missing")):
            rt.log(f"mix: warning: the input has no {group} samples; the other groups took its share "
                   f"(label them with `orlhf label inputs=...`)")
    return 0
