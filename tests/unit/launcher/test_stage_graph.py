"""Stages wait for the stages whose outputs they read, not for every stage before them: on
Slurm the alignment methods, PPO and `rm` beside `generate` run side by side (was: one
straight chain, PPO queued behind all three offline methods), and a rerun runs again only
the stages downstream of a change (was: every stage after the first one that ran).
The real pipeline's graph: tests/unit/launcher/test_seeds.py (the demo, planned by the stages)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from launcher import slurm
from launcher.local import DONE, stages_to_run
from launcher.plan import StagePlan, waits_among, waits_for


def stage(run_dir: Path, name: str, *reads: str, chain: str = "") -> StagePlan:
    """A stage writing run_dir/<chain>/<name> and reading run_dir/<chain>/<each of reads>."""
    root = run_dir / chain if chain else run_dir
    return StagePlan(name=name, stage=name, args=(), nodes=1, procs_per_node=1, stage_dir=root / name,
                     config_yaml=yaml.safe_dump({"run_dir": str(run_dir), "name": name}), time_limit=None,
                     chain=chain, reads=tuple(root / path for path in reads))


def offline_vs_ppo(run_dir: Path) -> list[StagePlan]:
    """The paper's comparison as its stages read each other (conf/pipeline/offline_vs_ppo.yaml),
    plus a model from outside the run (`base`, which no stage writes)."""
    return [stage(run_dir, "sft", "../base/model"),
            stage(run_dir, "rm", "sft/checkpoints"),
            stage(run_dir, "generate", "sft/checkpoints"),
            stage(run_dir, "label", "generate/samples.jsonl", "rm/checkpoints"),
            stage(run_dir, "mix", "label/labeled.jsonl"),
            *(stage(run_dir, f"align_{m}", "mix/alignment.jsonl", "sft/checkpoints") for m in ("mle", "rwr", "dt")),
            stage(run_dir, "ppo", "sft/checkpoints", "rm/checkpoints", "rm/checkpoints"),
            stage(run_dir, "eval", "sft/checkpoints", "align_mle/checkpoints", "align_rwr/checkpoints",
                  "align_dt/checkpoints", "ppo/checkpoints", "rm/checkpoints"),
            stage(run_dir, "report")]


def named(plans: list[StagePlan], waits: list[list[int]]) -> dict[str, list[str]]:
    return {plan.name: [plans[position].name for position in wait] for plan, wait in zip(plans, waits)}


def test_each_stage_waits_for_the_stages_it_reads_and_nothing_those_already_wait_for(tmp_path):
    plans = offline_vs_ppo(tmp_path)
    assert named(plans, waits_for(plans)) == {
        "sft": [], "rm": ["sft"], "generate": ["sft"], "label": ["rm", "generate"], "mix": ["label"],
        "align_mle": ["mix"], "align_rwr": ["mix"], "align_dt": ["mix"], "ppo": ["rm"],
        # eval reads sft and rm too, but waits for them through the policies trained from them
        "eval": ["align_mle", "align_rwr", "align_dt", "ppo"],
        "report": ["eval"]}  # reads the whole run: waits for all before it, through eval


def test_a_stage_reading_no_earlier_stage_waits_for_every_branch_still_open(tmp_path):
    """A report after two independent branches waits for both ends (were it to wait for the
    last one only, it could read a run whose other branch is still training)."""
    plans = [stage(tmp_path, "sft"), stage(tmp_path, "rm", "sft/checkpoints"),
             stage(tmp_path, "generate", "sft/checkpoints"), stage(tmp_path, "report")]
    assert named(plans, waits_for(plans))["report"] == ["rm", "generate"]
    straight = [stage(tmp_path, name) for name in ("a", "b", "c")]  # reading nothing: one after another
    assert named(straight, waits_for(straight)) == {"a": [], "b": ["a"], "c": ["b"]}


def test_a_replicates_stages_wait_within_its_chain_and_the_run_stage_for_every_chain(tmp_path):
    plans = [stage(tmp_path, "sft", chain="seed_0"), stage(tmp_path, "rm", "sft/ckpt", chain="seed_0"),
             stage(tmp_path, "sft", chain="seed_1"), stage(tmp_path, "rm", "sft/ckpt", chain="seed_1"),
             stage(tmp_path, "seeds-report")]
    assert waits_for(plans) == [[], [0], [], [2], [1, 3]]


def test_on_slurm_the_offline_methods_and_ppo_are_queued_side_by_side(tmp_path, monkeypatch):
    commands = []

    def fake_sbatch(command, timeout_s=60):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, f"{99 + len(commands)}\n", "")

    monkeypatch.setattr(slurm, "_run", fake_sbatch)
    plans = offline_vs_ppo(tmp_path)
    slurm.submit_chain(plans, [plan.stage_dir / "submission.sh" for plan in plans], waits_for(plans), max_attempts=1)
    dependencies = {Path(c[-1]).parent.name: c[2].removeprefix("--dependency=afterok:") if len(c) > 3 else ""
                    for c in commands}
    assert dependencies == {"sft": "", "rm": "100", "generate": "100", "label": "101:102", "mix": "103",
                            "align_mle": "104", "align_rwr": "104", "align_dt": "104", "ppo": "101",
                            "eval": "105:106:107:108", "report": "109"}


def completed(plan: StagePlan) -> None:
    for folder in (plan.stage_dir, plan.config_file.parent):  # PPO's config is its actor's (ppo_actor/)
        folder.mkdir(parents=True, exist_ok=True)
    plan.config_file.write_text(plan.config_yaml)
    (plan.stage_dir / DONE).write_text("done\n")


def test_a_rerun_after_one_method_failed_runs_it_and_what_reads_it_only(tmp_path):
    plans = offline_vs_ppo(tmp_path)
    for plan in plans:
        if plan.name not in ("align_rwr", "eval", "report"):  # rwr failed; eval and report never ran
            completed(plan)
    runs = stages_to_run(plans)
    assert [plan.name for plan, run in zip(plans, runs) if run] == ["align_rwr", "eval", "report"]
    # On Slurm the queued eval waits for align_rwr alone: the other policies are complete.
    assert waits_among(plans, runs) == [[], [0], [1]]


def test_a_changed_stage_reruns_what_reads_it_but_not_its_siblings(tmp_path):
    plans = offline_vs_ppo(tmp_path)
    for plan in plans:
        completed(plan)
    rm = next(plan for plan in plans if plan.name == "rm")
    (rm.stage_dir / DONE).unlink()  # its config changed, or it never finished
    reruns = [plan.name for plan, run in zip(plans, stages_to_run(plans)) if run]
    assert reruns == ["rm", "label", "mix", "align_mle", "align_rwr", "align_dt", "ppo", "eval", "report"]
    assert "generate" not in reruns  # it reads sft alone


@pytest.mark.parametrize("chain", ["", "seed_0"])
def test_an_input_in_a_folder_whose_name_extends_a_stage_folder_is_not_that_stage_s(tmp_path, chain):
    """align_dt/ is no output of a stage writing align/ (paths compare by component)."""
    plans = [stage(tmp_path, "align", chain=chain), stage(tmp_path, "align_dt", chain=chain),
             stage(tmp_path, "eval", "align_dt/checkpoints", chain=chain)]
    assert named(plans, waits_for(plans))["eval"] == ["align_dt"]
