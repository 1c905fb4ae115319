"""A hand-written run directory for the report tests: a ledger that reproduces the paper's
Table 3 (A100-hours: MLE 52.5, RWR 89, DT 90, PPO 730) plus a DPO method with a reference
pass, a resumed and a failed stage; evaluation results; optionally a judge's results."""

from __future__ import annotations

import json
from pathlib import Path

from offline_rlhf.eval.results import summarize

# (stage, device-hours) per ledger row, in the order the stages ran.
LEDGER_ROWS = [("sft", 1.5), ("sft", 30.0), ("rm", 8.5), ("generate", 20.0), ("label", 10.0), ("mix", 0.5),
               ("align_mle_filter", 12.0), ("align_mle_filter", 10.0),  # a resumed stage: two rows
               ("align_rwr", 58.5), ("align_dt", 59.5), ("reference", 5.0), ("align_dpo", 40.0),
               ("ppo_reward", 90.0), ("ppo_reference", 90.0), ("ppo_critic", 150.0), ("ppo_actor", 400.0),
               ("eval", 2.0)]
SCORES = {"sft": [0.0, 1.0, 2.0, 3.0], "dt": [1.0, 1.0, 3.0, 2.5], "dt_low": [0.0, 0.0, 1.0, 1.0],
          "ppo": [2.0, 1.0, 3.0, 3.0]}
JUDGE = {"format": "single", "judge_model": "gpt-4", "baseline": "sft",
         "summary": {"models": {"sft": {"mean": 6.45, "stderr": 0.2, "n": 160}, "dt": {"mean": 7.06, "stderr": 0.2,
                                                                                     "n": 160},
                                "ppo": {"mean": 7.02, "stderr": 0.25, "n": 160}}}}


def ledger_line(stage: str, hours: float, status: str = "completed") -> str:
    return json.dumps({"stage": stage, "start": "2026-01-01T00:00:00+00:00", "end": "2026-01-01T01:00:00+00:00",
                       "status": status, "nodes": 1, "processes": 8, "devices": 8, "device_type": "NVIDIA A100",
                       "wall_seconds": hours / 8 * 3600, "device_hours": hours, "tokens": 0})


def write_run(run_dir: Path, judge: bool = False) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    statuses = {0: "failed"}  # the first SFT try failed: its hours were spent all the same
    (run_dir / "ledger.jsonl").write_text("".join(ledger_line(stage, hours, statuses.get(index, "completed")) + "\n"
                                                  for index, (stage, hours) in enumerate(LEDGER_ROWS)))
    (run_dir / "eval").mkdir(exist_ok=True)
    table = summarize({name: {"gold": values} for name, values in SCORES.items()}, "sft", samples=100)
    models = {name: {"checkpoint": f"/ckpt/{name}", "reward_prompt": {"dt_low": -1.5}.get(name),
                     "reward_prompt_from": "config" if name == "dt_low" else None, "cut_off": index}
              for index, name in enumerate(SCORES)}
    results = {"baseline": "sft", "prompts": 4, "gold": "embedded_task", "rm": "", "max_new_tokens": 24,
               "models": models, "table": table}
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))
    if judge:
        (run_dir / "judge").mkdir(exist_ok=True)
        (run_dir / "judge" / "results.json").write_text(json.dumps(JUDGE))
    return run_dir
