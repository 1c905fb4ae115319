"""What the embedded-task integration tests share: the demo pipeline's settings of a stage,
and the gold reward of a model against SFT over several sampled evaluations."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml

from offline_rlhf.cli import main
from tests.fixtures import REPO_ROOT

EVAL_SEEDS = range(5)


def demo_overrides(stage: str, run_dir: Path) -> list[str]:
    """The demo pipeline's overrides of `stage`, with its run directory filled in."""
    pipeline = yaml.safe_load((REPO_ROOT / "conf" / "pipeline" / "demo.yaml").read_text())
    entry = next(s for s in pipeline["stages"] if s["stage"] == stage)
    return [o.replace("${run_dir}", str(run_dir)) for o in entry.get("overrides", [])]


def gold(eval_dir: Path, model: str) -> list[float]:
    return [json.loads(line)["gold"] for line in (eval_dir / f"answers_{model}.jsonl").read_text().splitlines()]


def gold_against_sft(run_dir: Path, name: str, checkpoint: str) -> dict[str, list[float]]:
    """Gold rewards of SFT and `name` (its checkpoint folder under run_dir) on the 200
    held-out prompts, answers sampled at temperature 1 with each of EVAL_SEEDS."""
    scores = {"sft": [], name: []}
    models = (f"models=[{{name: sft, checkpoint: '{run_dir}/sft/checkpoints'}}, "
              f"{{name: {name}, checkpoint: '{run_dir}/{checkpoint}'}}]")
    for seed in EVAL_SEEDS:
        assert main(["eval", f"run_dir={run_dir}", f"prompts={run_dir}/task/eval_prompts.jsonl", "prompt_key=prompt",
                     "gold=embedded_task", "generation.max_new_tokens=24", "generation.greedy=false",
                     f"generation.seed={seed}", models]) == 0
        for model in scores:
            scores[model] += gold(run_dir / "eval", model)
    return scores


def paired_gain(scores: dict[str, list[float]], name: str) -> tuple[float, float, float]:
    """Mean of name - sft over the same prompts and seeds, its standard error, and SFT's."""
    diff = [x - s for s, x in zip(scores["sft"], scores[name], strict=True)]
    mean, se = statistics.fmean(diff), statistics.stdev(diff) / math.sqrt(len(diff))
    return mean, se, statistics.stdev(scores["sft"]) / math.sqrt(len(diff))
