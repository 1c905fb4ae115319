"""Planning: stage validation through `orlhf STAGE --cfg` and the process layout."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import yaml

from launcher.compose import compose_launch
from launcher.local import run_locally
from launcher.plan import plan_pipeline
from launcher.schema import LaunchError


def plans_for(tmp_path, *overrides, cluster="local"):
    return plan_pipeline(compose_launch(["pipeline=smoke", f"cluster={cluster}", f"run_dir={tmp_path}", *overrides]))


def test_smoke_pipeline_resolves_through_the_stage_and_gets_two_processes(tmp_path):
    (plan,) = plans_for(tmp_path)
    assert (plan.name, plan.nodes, plan.procs_per_node) == ("smoke", 1, 2)
    assert plan.args == ("parallel.tp=2", f"run_dir={tmp_path}")
    assert "tp: 2" in plan.config_yaml and f"run_dir: {tmp_path}" in plan.config_yaml


def test_run_dir_with_comma_space_quote_and_non_ascii_reaches_the_stage_unchanged(tmp_path):
    """Forwarded unquoted, Hydra read the comma as a sweep and the stage failed."""
    run_dir = tmp_path / "runs, it's é"
    (plan,) = plan_pipeline(compose_launch(["pipeline=smoke", f'run_dir="{run_dir}"']))
    assert yaml.safe_load(plan.config_yaml)["run_dir"] == str(run_dir)
    assert plan.stage_dir == run_dir / "smoke"


def test_processes_default_to_tp_times_dp_with_fill_counted_as_one(tmp_path):
    (plan,) = plans_for(tmp_path, "pipeline.stages.0.nproc=null")
    assert plan.world_size == 2
    (plan,) = plans_for(tmp_path, "pipeline.stages.0.nproc=null", "pipeline.stages.0.overrides=['parallel.dp=3']")
    assert plan.world_size == 3


def test_gpu_cluster_runs_one_process_per_gpu(tmp_path):
    (plan,) = plans_for(tmp_path, "pipeline.stages.0.nproc=null", "pipeline.stages.0.nodes=4", cluster="slurm")
    assert (plan.nodes, plan.procs_per_node) == (4, 8)


def test_shared_nodes_in_torchrun_mode_need_cpus_per_task(tmp_path):
    """Was: Slurm gave a node's one torchrun task, and so all its workers, a single CPU."""
    shared = ["cluster.exclusive=false", "cluster.gpus_per_node=null"]
    with pytest.raises(LaunchError, match=r"^cluster.cpus_per_task: is unset on shared nodes "
                                          r"\(cluster.exclusive=false\): Slurm would give the one torchrun task "
                                          r"per node of pipeline.stages\[0\] \(smoke, 2 processes a node\) a single "
                                          r"CPU; set it to the CPUs"):
        plans_for(tmp_path, *shared, cluster="slurm")
    assert plans_for(tmp_path, *shared, "cluster.cpus_per_task=4", cluster="slurm")
    assert plans_for(tmp_path, *shared, "cluster.launch_mode=tasks", cluster="slurm")  # a task per process
    assert plans_for(tmp_path, "cluster.gpus_per_node=null", cluster="slurm")  # exclusive: the whole node
    assert plans_for(tmp_path, cluster="local_slurm")  # which sets cpus_per_task


@pytest.mark.parametrize("overrides, start", [
    (["pipeline.stages.0.nproc=3"], "pipeline.stages[0].nproc: 3 processes do not fit parallel.tp=2"),
    (["pipeline.stages.0.nodes=2"], "pipeline.stages[0].nodes: 2 nodes need a cluster"),
    (["pipeline.stages.0.overrides=['parallel.tp=0']"], "pipeline.stages[0] (smoke): orlhf smoke: error: parallel.tp"),
    (["pipeline.stages.0.overrides=['run_dir=/elsewhere']"], "pipeline.stages[0].overrides: run_dir is set by"),
    (["pipeline.stages.0.stage=no_such_stage"], "pipeline.stages[0] (no_such_stage): orlhf: unknown stage"),
])
def test_invalid_stages_fail_before_anything_runs(tmp_path, overrides, start):
    with pytest.raises(LaunchError, match="^" + start.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        plans_for(tmp_path, *overrides)
    assert not any(tmp_path.iterdir())


def test_paper_pipelines_compose_without_their_stages_existing_yet(tmp_path):
    """Stages are only asked to validate themselves when a pipeline is planned."""
    folders = {name: [s.folder for s in compose_launch([f"pipeline={name}", "cluster=slurm"]).pipeline.stages]
               for name in ("offline_dt", "offline_all")}
    assert folders == {
        "offline_dt": ["sft", "rm", "generate", "label", "mix", "align_dt", "eval"],
        "offline_all": ["sft", "rm", "generate", "label", "mix", "align_mle_filter", "align_rwr", "align_dt", "eval"],
    }


def test_duplicate_stage_folders_are_refused(tmp_path):
    cfg = compose_launch(["pipeline=smoke", f"run_dir={tmp_path}"])
    cfg.pipeline.stages.append(cfg.pipeline.stages[0])
    with pytest.raises(LaunchError, match=r"^pipeline.stages\[1\]: writes run_dir/smoke, as stages\[0\] does"):
        plan_pipeline(cfg)


def test_local_run_stops_at_the_first_failing_stage_and_prints_its_log(tmp_path, capsys):
    """`--cfg` makes a stage exit 0 at once; an unknown stage makes it exit 2."""
    (smoke,) = plans_for(tmp_path / "a")
    good = replace(smoke, args=(*smoke.args, "--cfg"), procs_per_node=1)
    bad = replace(good, name="broken", stage="no_such_stage", stage_dir=tmp_path / "broken")
    never = replace(good, name="never", stage_dir=tmp_path / "never")
    assert run_locally([good, bad, never], sys.executable, dry_run=False) == 1
    out, err = capsys.readouterr()
    assert "[1/3] smoke" in out and "[2/3] broken" in out and "[3/3]" not in out
    assert err.strip() == f"orlhf launch: stage broken failed (exit code 2); log: {tmp_path / 'broken' / 'launch.log'}"
    assert "unknown stage" in (tmp_path / "broken" / "launch.log").read_text()
    assert not (tmp_path / "never").exists()
