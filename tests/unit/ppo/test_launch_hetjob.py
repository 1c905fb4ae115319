"""The actor's side of the Slurm heterogeneous job: services placed in het groups are found
on their group's first node at the port derived from the job id, with the job's token, and
are asked to shut down at the end; nothing is started for them here."""

from __future__ import annotations

import threading

import pytest

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.samples import PromptSourceConfig
from offline_rlhf.config.schema import InitConfig
from ppo_baseline.config import SERVICES, PPOConfig, ServicesConfig, ServiceSettings
from ppo_baseline.launch import Services
from ppo_baseline.serve import TOKEN_ENV, het_group_host, service_port
from ppo_baseline.service import Service, write_token


def ppo_config(tmp_path, groups: dict[str, int], **changes) -> PPOConfig:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    settings = {name: ServiceSettings(checkpoint=str(tmp_path / name), het_group=groups.get(name))
                for name in SERVICES}
    return PPOConfig(run_dir=str(tmp_path), init=InitConfig(checkpoint=str(tmp_path / "sft")),
                     sources=[PromptSourceConfig(name="p", path=str(prompts))],
                     services=ServicesConfig(**settings, startup_timeout_s=20), **changes)


def test_ports_are_derived_alike_per_job_and_apart_per_service():
    job = {"SLURM_JOB_ID": "123"}
    ports = [service_port(name, job) for name in SERVICES]
    assert ports == [service_port(name, {"SLURM_JOB_ID": "123"}) for name in SERVICES]
    assert len({*ports, *(port + 1 for port in ports)}) == 6  # HTTP and rendezvous ports all differ
    assert all(26000 <= port < 32768 for port in ports)  # below the ephemeral range
    assert service_port("critic", {"SLURM_JOB_ID": "124"}) != service_port("critic", job)


def test_the_host_is_the_first_node_of_the_services_het_group(tmp_path):
    cfg = ppo_config(tmp_path, {"critic": 2})
    assert het_group_host(cfg, "critic", {"SLURM_JOB_NODELIST_HET_GROUP_2": "gpu[007-009],gpu1"}) == "gpu007"
    with pytest.raises(ConfigError, match="services.critic.het_group: is 2, but this process is in no Slurm"):
        het_group_host(cfg, "critic", {"SLURM_JOB_NODELIST_HET_GROUP_1": "n1"})


def test_serve_names_a_service_placed_in_a_het_group(tmp_path):
    assert ppo_config(tmp_path, {"critic": 1}, serve="critic").serve == "critic"
    for serve in ("reward", "actor"):
        with pytest.raises(ConfigError, match="serve: .* is not a service placed in a het group"):
            ppo_config(tmp_path, {"critic": 1}, serve=serve)
    with pytest.raises(ConfigError, match="^services.critic.het_group: must be >= 1"):
        ppo_config(tmp_path, {"critic": 0})


def test_the_actor_finds_remote_services_by_het_group_and_shuts_them_down(tmp_path, monkeypatch):
    token = write_token(tmp_path / "token")
    monkeypatch.setenv(TOKEN_ENV, str(tmp_path / "token"))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST_HET_GROUP_1", "127.0.0.1")
    monkeypatch.setenv("SLURM_JOB_NODELIST_HET_GROUP_2", "localhost")
    groups = {"critic": 1, "reward": 1, "reference": 2}
    running = [Service(name, token, host="127.0.0.1", port=service_port(name)).start() for name in SERVICES]
    threads = [threading.Thread(target=service.serve, daemon=True) for service in running]
    for thread in threads:
        thread.start()
    services = Services(ppo_config(tmp_path, groups), tmp_path / "ppo")
    with services:
        assert all(service.process is None for service in services.processes.values())
        assert services.processes["reference"].url == f"http://localhost:{service_port('reference')}"
        assert services.processes["critic"].client.health()["ready"]
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()  # each got POST /shutdown
    assert not (tmp_path / "ppo" / "token").exists()  # the job's token is used, none written


def test_remote_services_need_the_jobs_token(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match="PPO_TOKEN_FILE names no token file"):
        Services(ppo_config(tmp_path, {"critic": 1}), tmp_path / "ppo").start()
