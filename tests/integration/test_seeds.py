"""`pipeline.seeds` end to end on this machine: a tiny pipeline (task data, SFT, evaluation
by the gold reward, report) over two training seeds, each replicate in run_dir/seed_<s>/,
then `orlhf seeds-report` across them; a rerun runs nothing and a third seed runs only its
own replicate and the report again."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from launcher.compose import compose_launch
from launcher.local import run_locally
from launcher.plan import plan_pipeline
from launcher.schema import StageEntry
from offline_rlhf.checkpoint import latest_checkpoint, load_checkpoint, read_meta
from offline_rlhf.models.llama import Transformer

pytestmark = pytest.mark.slow
TINY = [
    StageEntry(stage="task", overrides=["n_sft=64", "n_preferences=1", "n_gen_prompts=1", "n_eval_prompts=8"]),
    StageEntry(stage="sft", overrides=["model=tiny", "data=embedded_task_sft",
                                       "init.tokenizer=${run_dir}/task/tokenizer", "train.global_batch=16",
                                       "train.micro_batch=16", "train.max_steps=2", "train.val_every=0"]),
    StageEntry(stage="eval", overrides=["prompts=${run_dir}/task/eval_prompts.jsonl", "prompt_key=prompt", "rm=",
                                        "gold=embedded_task", "generation.max_new_tokens=4", "generation.greedy=false",
                                        "models=[{name: sft, checkpoint: '${run_dir}/sft/checkpoints'}]"]),
    StageEntry(stage="report"),
]


def sweep(run_dir, seeds: str):
    cfg = compose_launch(["pipeline=smoke", f"run_dir={run_dir}", f"pipeline.seeds={seeds}"])
    cfg.pipeline.stages = TINY
    return plan_pipeline(cfg)


def sft_weights(replicate) -> dict[str, torch.Tensor]:
    checkpoint = latest_checkpoint(replicate / "sft" / "checkpoints")
    model = Transformer(read_meta(checkpoint).model)
    load_checkpoint(checkpoint, model)
    return model.state_dict()


def test_two_seeds_then_a_rerun_then_a_third_seed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    plans = sweep(run_dir, "[0,1]")
    assert run_locally(plans, sys.executable, dry_run=False) == 0
    for replicate in (run_dir / "seed_0", run_dir / "seed_1"):
        assert all((replicate / folder / "DONE").exists() for folder in ("task", "sft", "eval", "report"))
        assert (replicate / "report.json").exists()
    first, second = sft_weights(run_dir / "seed_0"), sft_weights(run_dir / "seed_1")
    assert first.keys() == second.keys()
    # Initialized from each replicate's train.seed (the norms start at 1 in both).
    assert not any(torch.equal(first[name], second[name]) for name in first if "norm" not in name)
    # The task data is the same in both replicates: only training randomness differs.
    assert (run_dir / "seed_0/task/sft.jsonl").read_bytes() == (run_dir / "seed_1/task/sft.jsonl").read_bytes()
    report = json.loads((run_dir / "seeds_report.json").read_text())
    assert [r["name"] for r in report["replicates"]] == ["seed_0", "seed_1"]
    assert (run_dir / "seeds_report.md").exists() and (run_dir / "seeds-report" / "DONE").exists()
    assert json.loads((run_dir / "ledger.jsonl").read_text().splitlines()[-1])["stage"] == "seeds-report"

    capsys.readouterr()
    assert run_locally(plans, sys.executable, dry_run=False) == 0
    assert capsys.readouterr().out.count("already complete, skipped") == len(plans)

    plans = sweep(run_dir, "[0,1,2]")
    assert run_locally(plans, sys.executable, dry_run=False) == 0
    out = capsys.readouterr().out
    ran = [line.split("] ")[1].split(":")[0] for line in out.splitlines() if line.startswith("[")
           and "already complete" not in line]
    assert ran == ["seed_2.task", "seed_2.sft", "seed_2.eval", "seed_2.report", "seeds-report"]
    report = json.loads((run_dir / "seeds_report.json").read_text())
    assert [r["name"] for r in report["replicates"]] == ["seed_0", "seed_1", "seed_2"]
