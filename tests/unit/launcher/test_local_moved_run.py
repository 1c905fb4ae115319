"""A pipeline relaunched after its run folder moved whole (scratch to project storage)
skips the stages that were complete, as the stages' own resume checks accept the move
(was: every stage ran again, eval and label recomputing everything)."""

from __future__ import annotations

from pathlib import Path

import yaml

from launcher.local import DONE, stages_to_run
from launcher.plan import StagePlan


def planned(run_dir: Path, name: str, **settings) -> StagePlan:
    config = {"run_dir": str(run_dir), "input": f"{run_dir}/{name}_in.jsonl", "models": [f"{run_dir}/sft/ckpt"],
              "data": "/data/shared.jsonl", **settings}
    return StagePlan(name=name, stage=name, args=(), nodes=1, procs_per_node=1, stage_dir=run_dir / name,
                     config_yaml=yaml.safe_dump(config), time_limit=None)


def completed(plan: StagePlan) -> None:
    plan.stage_dir.mkdir(parents=True)
    plan.config_file.write_text(plan.config_yaml)
    (plan.stage_dir / DONE).write_text("done\n")


def test_a_moved_run_skips_its_complete_stages_but_not_a_changed_one(tmp_path):
    old, new = tmp_path / "scratch" / "run", tmp_path / "project" / "run"
    for name in ("label", "mix"):
        completed(planned(old, name))
    completed(planned(old, "eval", data=f"{old}-other/x.jsonl"))  # a sibling folder's file, not the run's
    new.parent.mkdir()
    old.rename(new)
    assert stages_to_run([planned(new, "label"), planned(new, "mix")]) == [False, False]
    assert stages_to_run([planned(new, "label", seed=2), planned(new, "mix")]) == [True, True]  # a real change
    assert stages_to_run([planned(new, "eval", data=f"{new}-other/x.jsonl")]) == [True]  # the sibling did not move
