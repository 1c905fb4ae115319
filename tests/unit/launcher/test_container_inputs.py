"""With a container image (pyxis) a stage sees only the image, run_dir (mounted at its own path)
and the `cluster.container_mounts`, and starts in the image's working directory: an input
path that exists here but not there is refused at launch, not found missing in the job."""

from __future__ import annotations

import json

import pytest

from launcher.compose import compose_launch
from launcher.plan import StagePlan, check_inputs, plan_pipeline
from launcher.schema import ClusterConfig, LaunchError, StageEntry

IMAGE = "/lustre/images/orlhf.sqsh"


def check(tmp_path, path: str, mounts=(), image=IMAGE, kind="slurm", exists=True) -> None:
    run_dir = tmp_path / "run"
    plan = StagePlan(name="sft", stage="sft", args=(), nodes=1, procs_per_node=1, stage_dir=run_dir / "sft",
                     config_yaml="", time_limit=None)
    cluster = ClusterConfig(kind=kind, container_image=image, container_mounts=list(mounts))
    check_inputs([plan], [[{"key": "data.sources[0].path", "path": path, "exists": exists}]],
                 ["pipeline.stages[0]"], cluster, run_dir)


def refused(tmp_path, path: str, mounts=()) -> str:
    with pytest.raises(LaunchError) as info:
        check(tmp_path, path, mounts)
    return str(info.value)


def test_a_relative_path_is_refused_with_its_key_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft.jsonl").write_text("{}\n")
    assert refused(tmp_path, "data/sft.jsonl") == (
        "pipeline.stages[0] (sft) data.sources[0].path: 'data/sft.jsonl' is a relative path, which a stage in the "
        "container reads from the image's working directory, not from here; give an absolute path under run_dir, or "
        "add a cluster.container_mounts item that mounts its folder at the same path (SRC:SRC)")


def test_an_absolute_path_outside_run_dir_and_the_mounts_is_refused(tmp_path):
    message = refused(tmp_path, "/home/me/sft.jsonl", mounts=["/lustre/data:/lustre/data"])
    assert message.startswith("pipeline.stages[0] (sft) data.sources[0].path: /home/me/sft.jsonl is neither under "
                              f"run_dir ({tmp_path / 'run'}) nor under a cluster.container_mounts item mounted at the "
                              "same path, so the stage in the container does not see it; give an absolute path")


def test_a_mount_at_another_path_is_named(tmp_path):
    message = refused(tmp_path, "/lustre/data/sft.jsonl", mounts=["/lustre/data:/data:ro"])
    assert "does not see it (cluster.container_mounts mounts /lustre/data at /data, another path); " in message


@pytest.mark.parametrize(("path", "mounts"), [
    ("/lustre/data/sft.jsonl", ["/lustre/data:/lustre/data"]),
    ("/lustre/data/x/../sft.jsonl", ["/lustre/data/:/lustre/data:ro"]),  # normalized; flags after the target
    ("/lustre/data/sft.jsonl", ["/lustre/data"]),  # pyxis: no target is the same path
    ("{run}/sft/out.jsonl", []),  # an earlier stage's output or any file in the run
    ("meta-llama/Llama-3.1-8B", []),  # a Hugging Face repo id, no path
])
def test_visible_paths_and_hub_ids_pass(tmp_path, path, mounts):
    check(tmp_path, path.format(run=tmp_path / "run"), mounts)


def test_without_a_container_or_off_slurm_nothing_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft.jsonl").write_text("{}\n")
    check(tmp_path, "sft.jsonl", image=None)
    check(tmp_path, "sft.jsonl", kind="local")


def test_a_launch_with_a_container_refuses_a_relative_data_path(tmp_path, monkeypatch):
    """Through the stage's own --check: the path it reports is the path as written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    (tmp_path / "tokenizer").mkdir()
    cfg = compose_launch(["pipeline=smoke", "cluster=slurm", f"run_dir={tmp_path / 'run'}",
                          f"cluster.container_image={IMAGE}", "cluster.gpus_per_node=null"])
    cfg.pipeline.stages = [StageEntry(stage="sft", overrides=[
        "model=tiny", "data.sources=[{name: d, format: jsonl, path: sft.jsonl}]", "train.global_batch=8",
        "train.micro_batch=1", f"init.tokenizer={tmp_path / 'tokenizer'}"], nproc=1)]
    with pytest.raises(LaunchError, match=r"^pipeline.stages\[0\] \(sft\) data.sources\[0\].path: 'sft.jsonl' is a "
                                          r"relative path, which a stage in the container reads"):
        plan_pipeline(cfg)
