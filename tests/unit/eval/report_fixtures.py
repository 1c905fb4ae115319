"""A hand-written run directory for the report tests: a ledger that reproduces the paper's
Table 3 (A100-hours: MLE 52.5, RWR 89, DT 90, PPO 730) plus a DPO method with a reference
pass, a resumed stage, failed and interrupted executions (not charged); evaluation results;
optionally a judge's results with the config.yaml naming the eval answers it graded."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from offline_rlhf.eval.results import summarize

# (stage, device-hours) per ledger row, in the order the stages ran (row i runs in hour i of T0).
LEDGER_ROWS = [("sft", 1.5), ("sft", 30.0), ("rm", 8.5), ("generate", 20.0), ("label", 10.0), ("mix", 0.5),
               ("align_mle_filter", 12.0), ("align_mle_filter", 10.0),  # killed, then resumed: both charged
               ("align_rwr", 58.5), ("align_dt", 59.5), ("reference", 5.0), ("align_dpo", 40.0),
               ("ppo_reward", 90.0), ("ppo_reference", 90.0), ("ppo_critic", 150.0), ("ppo_actor", 400.0),
               ("eval", 0.25), ("eval", 2.0), ("align_rwr", 3.0)]
# Not completed: the first SFT try and an eval with a bad input failed; a rerun of RWR was
# killed and not completed since. The first MLE-filter execution was killed and resumed.
STATUSES = {0: "failed", 6: "interrupted", 16: "failed", 18: "interrupted"}
SERVING = {12: 15, 13: 15, 14: 15}  # PPO's services run in the hour of the actor they serve
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
TRAINED_IN = {"sft": "sft", "dt": "align_dt", "dt_low": "align_dt", "ppo": "ppo"}  # each evaluated model's stage folder
SCORES = {"sft": [0.0, 1.0, 2.0, 3.0], "dt": [1.0, 1.0, 3.0, 2.5], "dt_low": [0.0, 0.0, 1.0, 1.0],
          "ppo": [2.0, 1.0, 3.0, 3.0]}
JUDGE = {"format": "single", "judge_model": "gpt-4", "baseline": "sft", "models": ["sft", "dt", "ppo"],
         "summary": {"models": {"sft": {"mean": 6.45, "stderr": 0.2, "n": 160}, "dt": {"mean": 7.06, "stderr": 0.2,
                                                                                     "n": 160},
                                "ppo": {"mean": 7.02, "stderr": 0.25, "n": 160}}}}


def ledger_line(stage: str, hours: float, status: str = "completed", hour: int = 0) -> str:
    """A ledger row that starts `hour` hours after T0 and lasts one hour."""
    start = T0 + timedelta(hours=hour)
    return json.dumps({"stage": stage, "start": start.isoformat(), "end": (start + timedelta(hours=1)).isoformat(),
                       "status": status, "nodes": 1, "processes": 8, "devices": 8, "device_type": "NVIDIA A100",
                       "wall_seconds": hours / 8 * 3600, "device_hours": hours, "tokens": 0})


def append_ledger(run_dir: Path, stage: str, hours: float, status: str = "completed") -> None:
    """One more row, an hour after the last one."""
    hour = len((run_dir / "ledger.jsonl").read_text().splitlines())
    with open(run_dir / "ledger.jsonl", "a") as handle:
        handle.write(ledger_line(stage, hours, status, hour) + "\n")


def write_judge(run_dir: Path, judge: dict, answers: dict[str, str]) -> None:
    """judge/results.json and the config.yaml `orlhf judge` writes beside it, naming the
    answer file of each model (relative to the working directory, as the CLI records it)."""
    (run_dir / "judge").mkdir(exist_ok=True)
    (run_dir / "judge" / "results.json").write_text(json.dumps(judge))
    config = {"run_dir": str(run_dir), "answers": [{"model": m, "path": p} for m, p in answers.items()]}
    (run_dir / "judge" / "config.yaml").write_text(yaml.safe_dump(config))


def eval_answers(run_dir: Path, models: list[str]) -> dict[str, str]:
    return {model: str(run_dir / "eval" / f"answers_{model}.jsonl") for model in models}


def write_run(run_dir: Path, judge: bool = False) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "ledger.jsonl").write_text("".join(ledger_line(stage, hours, STATUSES.get(index, "completed"),
                                                              SERVING.get(index, index)) + "\n"
                                                  for index, (stage, hours) in enumerate(LEDGER_ROWS)))
    (run_dir / "eval").mkdir(exist_ok=True)
    table = summarize({name: {"gold": values} for name, values in SCORES.items()}, "sft", samples=100)
    models = {name: {"checkpoint": str(run_dir / TRAINED_IN[name] / "checkpoints" / "step_00000001"),
                     "reward_prompt": {"dt_low": -1.5}.get(name),
                     "reward_prompt_from": "config" if name == "dt_low" else None, "cut_off": index}
              for index, name in enumerate(SCORES)}
    results = {"baseline": "sft", "prompts": 4, "gold": "embedded_task", "rm": "", "max_new_tokens": 24,
               "models": models, "table": table}
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))
    if judge:  # after the evaluation, on its answers
        write_judge(run_dir, JUDGE, eval_answers(run_dir, JUDGE["models"]))
        append_ledger(run_dir, "judge", 0.01)
    return run_dir
