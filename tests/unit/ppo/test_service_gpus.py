"""Where the services the actor starts on its node run: GPUs of their own after the actor's
local ranks (CUDA_VISIBLE_DEVICES of each service process), honouring a CUDA_VISIBLE_DEVICES
the actor was given, one refusal line when the node has too few, the actor's GPUs with
services.share_gpus, and nothing changed without CUDA. Was: every service inherited the
actor's environment minus its world variables, so device_for gave every service's rank 0
cuda:0, next to actor rank 0 (an out-of-memory at 8B). CUDA is faked: no GPU is needed."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from offline_rlhf.config.errors import ConfigError
from ppo_baseline import launch
from ppo_baseline.config import SERVICES
from ppo_baseline.launch import Services
from ppo_baseline.serve import TOKEN_ENV
from tests.unit.ppo.test_launch_hetjob import ppo_config

# Actor rank 0 of `torchrun --nproc-per-node=4` (the actor's local ranks take GPUs 0-3).
TORCHRUN_RANK0 = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def started_envs(tmp_path, monkeypatch, environ: dict[str, str], cfg=None) -> dict[str, dict[str, str]]:
    """The environment Services.start gives each service process (nothing is started)."""
    for key in ("CUDA_VISIBLE_DEVICES", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", TOKEN_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    envs = {}

    def popen(command, env, **kwargs):
        envs[env["PPO_SERVICE_CONFIG"].split("/")[-2]] = env
        return SimpleNamespace(pid=-1, poll=lambda: None)

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    services = Services(cfg or ppo_config(tmp_path, {}), tmp_path / "ppo")
    (tmp_path / "ppo").mkdir(exist_ok=True)
    services.start()  # never stopped: no process exists
    return envs


def with_nproc(cfg, **nprocs):
    services = cfg.services
    for name, nproc in nprocs.items():
        services = replace(services, **{name: replace(getattr(services, name), nproc=nproc)})
    return replace(cfg, services=services)


def test_each_service_gets_gpus_of_its_own_after_the_actors_local_ranks(tmp_path, monkeypatch):
    fake_cuda(monkeypatch, 8)
    cfg = with_nproc(ppo_config(tmp_path, {}), critic=2)
    envs = started_envs(tmp_path, monkeypatch, TORCHRUN_RANK0, cfg)
    assert {name: env.get("CUDA_VISIBLE_DEVICES") for name, env in envs.items()} == {
        "reward": "4", "reference": "5", "critic": "6,7"}
    assert not any(key in env for env in envs.values() for key in TORCHRUN_RANK0)  # a world of its own, as before


def test_an_existing_cuda_visible_devices_list_is_honoured(tmp_path, monkeypatch):
    fake_cuda(monkeypatch, 6)  # the six GPUs the list names
    envs = started_envs(tmp_path, monkeypatch, {**TORCHRUN_RANK0, "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2",
                                                "CUDA_VISIBLE_DEVICES": "7, 6,GPU-5a1b,4,3,2"})
    assert {name: env["CUDA_VISIBLE_DEVICES"] for name, env in envs.items()} == {
        "reward": "GPU-5a1b", "reference": "4", "critic": "3"}


def test_a_single_process_actor_keeps_gpu_0_and_services_placed_elsewhere_stay_out(tmp_path, monkeypatch):
    fake_cuda(monkeypatch, 2)
    monkeypatch.setenv("SLURM_JOB_NODELIST_HET_GROUP_1", "127.0.0.1")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    token = tmp_path / "job-token"
    token.write_text("secret\n")
    token.chmod(0o600)
    envs = started_envs(tmp_path, monkeypatch, {TOKEN_ENV: str(token)},
                        ppo_config(tmp_path, {"critic": 1, "reward": 1}))
    assert {name: env["CUDA_VISIBLE_DEVICES"] for name, env in envs.items()} == {"reference": "1"}


def test_too_few_gpus_for_the_layout_is_refused_in_one_line(tmp_path, monkeypatch):
    fake_cuda(monkeypatch, 8)
    cfg = with_nproc(ppo_config(tmp_path, {}), critic=2)
    with pytest.raises(ConfigError) as error:
        started_envs(tmp_path, monkeypatch, {**TORCHRUN_RANK0, "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "8"}, cfg)
    assert str(error.value) == (
        "services: the actor's 8 process(es) on this node and the services started beside it (reward 1, "
        "reference 1, critic 2) need 12 GPUs, one per process, but this node shows 8: "
        "0,1,2,3,4,5,6,7; run fewer actor processes per node or fewer service processes "
        "(services.NAME.nproc), run the services on other nodes (`orlhf launch cluster=slurm`), or set "
        "services.share_gpus=true to run them on the actor's GPUs (small models)")
    assert "\n" not in str(error.value)


def test_share_gpus_keeps_the_services_on_the_actors_gpus(tmp_path, monkeypatch):
    fake_cuda(monkeypatch, 1)  # a one-GPU machine running a small PPO
    cfg = ppo_config(tmp_path, {})
    cfg = replace(cfg, services=replace(cfg.services, share_gpus=True))
    envs = started_envs(tmp_path, monkeypatch, {"CUDA_VISIBLE_DEVICES": "3"}, cfg)
    assert {name: env["CUDA_VISIBLE_DEVICES"] for name, env in envs.items()} == dict.fromkeys(SERVICES, "3")


def test_without_cuda_nothing_changes(tmp_path, monkeypatch):
    fake_cuda(monkeypatch, 0)
    envs = started_envs(tmp_path, monkeypatch, TORCHRUN_RANK0)
    assert all("CUDA_VISIBLE_DEVICES" not in env and env["OMP_NUM_THREADS"] for env in envs.values())


def test_the_pure_placement_functions():
    assert launch.place_services({"reward": 1, "reference": 2, "critic": 1}, 1, ["a", "b", "c", "d", "e"]) == {
        "reward": ["b"], "reference": ["c", "d"], "critic": ["e"]}
    assert launch.visible_gpus({}, 3) == ["0", "1", "2"]
    assert launch.visible_gpus({"CUDA_VISIBLE_DEVICES": "5,1,9"}, 2) == ["5", "1"]  # CUDA stops at what exists
    assert launch.visible_gpus({"CUDA_VISIBLE_DEVICES": "5"}, 0) == []
    # The actor's processes on the services' node: torchrun's, a Slurm step's first node's, one.
    assert launch.actor_processes_here(TORCHRUN_RANK0) == 4
    assert launch.actor_processes_here({**TORCHRUN_RANK0, "WORLD_SIZE": "16"}) == 4  # 4 nodes of 4
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0"}
    assert launch.actor_processes_here({**slurm, "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}) == 8
    assert launch.actor_processes_here({**slurm, "SLURM_TASKS_PER_NODE": "6,10"}) == 6
    assert launch.actor_processes_here({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == 1
    assert launch.actor_processes_here({}) == 1


def test_a_service_after_another_in_its_slurm_component_skips_that_ones_gpus(monkeypatch):
    """`orlhf ppo serve=reward` with PPO_GPU_OFFSET=2 (the critic, 2 a node, before it):
    its local ranks take the node's GPUs 2, 3, ... instead of the critic's 0, 1."""
    from ppo_baseline.serve import skip_gpus

    environ = {"PPO_GPU_OFFSET": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    skip_gpus("reward", environ)
    assert environ["CUDA_VISIBLE_DEVICES"] == "2,3,4,5,6,7"
    untouched = {"CUDA_VISIBLE_DEVICES": "0,1"}
    skip_gpus("critic", untouched)  # the first module of its component: no offset
    assert untouched == {"CUDA_VISIBLE_DEVICES": "0,1"}
    fake_cuda(monkeypatch, 4)  # no list: NVML's count
    environ = {"PPO_GPU_OFFSET": "1"}
    skip_gpus("reward", environ)
    assert environ["CUDA_VISIBLE_DEVICES"] == "1,2,3"
    fake_cuda(monkeypatch, 0)  # a CPU node: nothing to skip
    environ = {"PPO_GPU_OFFSET": "1"}
    skip_gpus("reward", environ)
    assert "CUDA_VISIBLE_DEVICES" not in environ
    with pytest.raises(ConfigError, match=r"^services.reward: its processes start at GPU 2 of their node "
                                          r"\(PPO_GPU_OFFSET, after the service before it in its het group\), "
                                          r"but the node shows 2; "):
        skip_gpus("reward", {"PPO_GPU_OFFSET": "2", "CUDA_VISIBLE_DEVICES": "0,1"})
