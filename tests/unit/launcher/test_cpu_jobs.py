"""Stages that use no GPU (task, mix, report, seeds-report, judge) run as CPU jobs on a GPU
cluster: no GPUs, no whole node, in cluster.cpu_partition, one process; an entry's
gpus_per_node changes what any stage's job asks for."""

from __future__ import annotations

from dataclasses import replace

import pytest

from launcher.compose import compose_launch
from launcher.plan import plan_pipeline
from launcher.render import sbatch_directives
from launcher.schema import ClusterConfig, LaunchError, StageEntry
from tests.unit.launcher.test_render import gpu_cluster, make_plan


def resources(plan, cluster) -> list[str]:
    return [d for d in sbatch_directives(plan, cluster) if not d.startswith(("--job-name", "--output", "--error"))]


def test_a_cpu_job_asks_for_no_gpu_and_no_whole_node_in_the_cpu_partition():
    mix = replace(make_plan("mix"), cpu_only=True)
    assert resources(mix, gpu_cluster(cpu_partition="cpu")) == [
        "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=64", "--partition=cpu", "--account=llm",
        "--signal=USR1@120"]
    assert "--partition=batch" in resources(mix, gpu_cluster())  # no CPU partition: the cluster's
    assert "--mem=500G" in resources(mix, gpu_cluster(mem="500G"))  # a size is kept, all of a node's is not


def test_a_gpu_job_asks_for_the_entrys_gpus_or_the_clusters():
    sft = make_plan("sft")
    assert resources(sft, gpu_cluster(cpu_partition="cpu"))[:3] == ["--nodes=1", "--ntasks-per-node=1",
                                                                     "--gpus-per-node=8"]
    assert "--partition=batch" in resources(sft, gpu_cluster(cpu_partition="cpu"))
    assert "--exclusive" in resources(sft, gpu_cluster())
    assert "--gpus-per-node=2" in resources(replace(sft, gpus_per_node=2), gpu_cluster())


def smoke_launch(tmp_path):
    """conf/pipeline/smoke.yaml on the GPU Slurm cluster, its entry's process count left to the GPUs."""
    cfg = compose_launch(["pipeline=smoke", "cluster=slurm", f"run_dir={tmp_path}"])
    return cfg, replace(cfg.pipeline.stages[0], nproc=None)


def test_planned_cpu_stages_take_one_process_and_gpu_stages_one_per_gpu(tmp_path):
    cfg, smoke = smoke_launch(tmp_path)
    cfg.pipeline.stages = [StageEntry(stage="task"), smoke, StageEntry(stage="report")]
    planned = {plan.name: plan for plan in plan_pipeline(cfg)}
    assert {name: (plan.cpu_only, plan.world_size) for name, plan in planned.items()} == {
        "task": (True, 1), "smoke": (False, 8), "report": (True, 1)}  # was 8 processes for task and report too


def test_an_entrys_gpus_per_node_overrides_both_ways(tmp_path):
    cfg, smoke = smoke_launch(tmp_path)
    cfg.pipeline.stages = [StageEntry(stage="report", gpus_per_node=1), replace(smoke, gpus_per_node=4)]
    report, smoke_plan = plan_pipeline(cfg)
    assert (report.cpu_only, report.gpus_per_node, report.world_size) == (False, 1, 1)
    assert (smoke_plan.cpu_only, smoke_plan.world_size) == (False, 4)
    assert "--gpus-per-node=4" in resources(smoke_plan, cfg.cluster)
    cfg.pipeline.stages = [replace(smoke, gpus_per_node=0, nproc=2)]
    [cpu] = plan_pipeline(cfg)
    assert cpu.cpu_only and not any(d.startswith("--gpus") for d in resources(cpu, cfg.cluster))


def test_negative_gpus_and_a_bad_cpu_partition_are_refused():
    with pytest.raises(LaunchError, match=r"^pipeline.stages\[0\].gpus_per_node: must be >= 0, got -1"):
        StageEntry(stage="mix", gpus_per_node=-1).check("pipeline.stages[0]")
    with pytest.raises(LaunchError, match=r"^cluster.cpu_partition: "):
        ClusterConfig(kind="slurm", cpu_partition="cpu;rm")
