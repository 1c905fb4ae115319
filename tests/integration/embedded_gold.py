"""What the embedded-task integration tests share: a check that the demo pipeline's stages
they start from (conftest.DemoStages) ran with their settings, and the gold reward of a
model against SFT over several sampled evaluations."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from offline_rlhf.cli import main

EVAL_SEEDS = range(5)


def assert_settings(config: Path, overrides: list[str]) -> None:
    """The resolved config a stage wrote holds each of `overrides` (key=value)."""
    ran, settings = OmegaConf.load(config), OmegaConf.from_dotlist(overrides)
    for key in (override.split("=", 1)[0] for override in overrides):
        assert OmegaConf.select(ran, key) == OmegaConf.select(settings, key), (config, key)


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
