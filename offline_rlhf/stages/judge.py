"""`orlhf judge`: a judge model behind an OpenAI-compatible endpoint grades answer files
into `run_dir/judge/`: judgments_<format>.jsonl (FastChat's judgment format), calls.jsonl
(every reply, appended as it arrives: a rerun sends only what is missing), results.json,
results.md and scores.png.

Imports no torch: the work is HTTP and text. So it claims its folder and writes config.yaml
with host's `claim_stage` / `open_stage` (what `stage_runtime` uses), not `stage_runtime`
itself, and records a one-process CPU ledger row (the judge's own cost is the endpoint's
tokens, which results.json counts)."""

from __future__ import annotations

from pathlib import Path

from offline_rlhf.config.compose import to_yaml
from offline_rlhf.config.judging import JudgeConfig
from offline_rlhf.eval.judge.runner import run_judge
from offline_rlhf.eval.judge.summary import unusable_line
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.host import DONE, claim_stage, open_stage, release_stage_lock
from offline_rlhf.ledger import OneProcess, track

STAGE = "judge"


def main(cfg: JudgeConfig) -> int:
    out = Path(cfg.run_dir) / STAGE
    lock, note = claim_stage(out, STAGE)  # two runs would send every request twice
    try:
        open_stage(out, note, to_yaml(cfg))
        with track(cfg.run_dir, STAGE, OneProcess(), "cpu"):
            results = run_judge(cfg, out, lambda line: print(line, flush=True))
        print((out / "results.md").read_text(), end="", flush=True)
        unusable = results["summary"]["unusable"]
        skipped = f"; {unusable_line(unusable)} skipped" if unusable else ""
        print(f"judge: {results['judgments']} judgments ({results['sent']} requests sent, {results['retries']} "
              f"retries{skipped}) in {out}", flush=True)
        write_atomic(out / DONE, f"{out / 'results.json'}\n")
    finally:
        release_stage_lock(lock)
    return 0
