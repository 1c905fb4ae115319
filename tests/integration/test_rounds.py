"""Iterative rounds end to end (`pipeline.rounds: 2`): the demo's DT loop (generate -> label
-> mix -> align) runs twice, round 2 in run_dir/round_2/ from round 1's DT policy with the
RM fixed; eval scores both rounds' policies and the report shows each round's quality and
cumulative device-hours."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from launcher.compose import compose_launch
from launcher.local import run_locally
from launcher.plan import plan_pipeline
from offline_rlhf.checkpoint import latest_checkpoint, read_meta
from offline_rlhf.ledger import read_ledger

pytestmark = pytest.mark.slow
LOOP = ("generate", "label", "mix", "align_dt")


def rounds_pipeline(run_dir):
    cfg = compose_launch(["pipeline=demo", "cluster=local", f"run_dir={run_dir}"])
    kept = [e for e in cfg.pipeline.stages if e.folder in ("task", "sft", "rm", *LOOP)]
    loop = [dataclasses.replace(e, repeat=e.folder in LOOP) for e in kept]
    models = ("models=[{name: sft, checkpoint: '${run_dir}/sft/checkpoints'}, "
              "{name: dt, checkpoint: '${run_dir}/align_dt/checkpoints'}, "
              "{name: dt_round_2, checkpoint: '${run_dir}/round_2/align_dt/checkpoints'}]")
    evaluation = next(e for e in cfg.pipeline.stages if e.stage == "eval")
    # One sampled answer per prompt (the demo's 8 weigh its statistical comparisons; nothing here compares).
    evaluation = dataclasses.replace(evaluation, overrides=[*[o for o in evaluation.overrides
                                                              if not o.startswith(("models=", "generation.n="))],
                                                            "generation.n=1", models])
    cfg.pipeline.stages = [*loop, evaluation, next(e for e in cfg.pipeline.stages if e.stage == "report")]
    cfg.pipeline.rounds = 2
    return cfg


def test_two_rounds_of_dt(tmp_path, capsys, demo_stages):
    # Round 1 and the stages before it are the demo's, same configs (conftest.DemoStages: run
    # once a session): this pipeline skips them as complete and runs round 2, eval and report.
    run_dir = demo_stages.copy_to(tmp_path / "run", ("task", "sft", "rm", *LOOP))
    plans = plan_pipeline(rounds_pipeline(run_dir))
    assert [p.name for p in plans][-6:] == ["round_2.generate", "round_2.label", "round_2.mix", "round_2.align_dt",
                                            "eval", "report"]
    capsys.readouterr()
    assert run_locally(plans, sys.executable, dry_run=False) == 0
    out = capsys.readouterr().out
    assert out.count("already complete, skipped") == len(plans) - 6  # task, sft, rm and round 1: copied

    second = run_dir / "round_2"
    generated = (second / "generate" / "config.yaml").read_text()
    assert f"checkpoint: {run_dir}/align_dt/checkpoints" in generated  # round 1's DT policy generates
    policy = read_meta(latest_checkpoint(second / "align_dt" / "checkpoints"))
    assert policy.metadata["alignment"]["method"] == "dt"
    assert {row.stage for row in read_ledger(second)} == set(LOOP)
    report = json.loads((run_dir / "report.json").read_text())
    rounds = [(r["method"], r["round"], r["model"]) for r in report["rounds"]]
    assert rounds == [("dt", 1, "dt"), ("dt", 2, "dt_round_2")]
    first, later = report["rounds"]
    assert later["cumulative_device_hours"] == pytest.approx(first["device_hours"] + later["device_hours"])
    assert later["quality"]["gold"]["n"] == 200
    assert "## Iterative rounds" in (run_dir / "report.md").read_text()
    (second / "align_dt" / "DONE").unlink()  # as if killed in round 2's alignment: a rerun resumes there
    capsys.readouterr()
    assert run_locally(plans, sys.executable, dry_run=False) == 0
    out = capsys.readouterr().out
    assert out.count("already complete, skipped") == len(plans) - 3  # round 2's align_dt, eval, report
    assert "round_2.align_dt: " in out and "round_2.generate: already complete" in out
