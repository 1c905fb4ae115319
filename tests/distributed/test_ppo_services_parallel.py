"""A PPO service run by a two-process gloo world (rank 0 serves HTTP and broadcasts every
request, both ranks compute) answers exactly what the one-process service answers."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.parallel.distributed import detect_env, device_for
from offline_rlhf.parallel.parallelize import build_mesh
from offline_rlhf.runtime import Runtime
from ppo_baseline.models import LOGPROBS, SCORES, TRAINED, VALUES
from ppo_baseline.service import Client
from ppo_baseline.services import build_service
from ppo_baseline.wire import Payload
from tests.distributed.launch import run_distributed
from tests.synthetic_preferences import MODEL, synthetic_tokenizer
from tests.unit.ppo.tiny_models import TOKEN, Running, rollout, service_config, write_checkpoints

LAYOUTS = {"tp2": dict(tp=2), "dp2": dict(dp=2)}


@pytest.fixture(scope="module")
def rm_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_tokenizer") / "tokenizer"
    synthetic_tokenizer(out)
    return out


def conversation(client: Client, name: str) -> dict[str, torch.Tensor]:
    """The calls each test makes of a service, and what came back."""
    batch = rollout(rows=8)
    if name == "reward":
        answer = client.call("score", Payload(batch), SCORES)
        return dict(answer.tensors)
    if name == "reference":
        return dict(client.call("logprobs", Payload(batch), LOGPROBS).tensors)
    values = client.call("values", Payload(batch), VALUES).tensors["values"]
    returns = torch.where(batch["mask"], torch.randn(8, 12, generator=torch.Generator().manual_seed(3)), 0.0)
    trained = client.call("train", Payload({**batch, "returns": returns, "old_values": values}, {"step": 0}), TRAINED)
    after = client.call("values", Payload(batch), VALUES).tensors["values"]
    return {"values": values, "after": after, "value_loss": torch.tensor(trained.meta["value_loss"])}


def _serve_in_world(rank, world_size, configs, parallel):
    dims = ParallelDims.build(ParallelConfig(**parallel), world_size, MODEL)
    device = device_for(detect_env())
    rt = Runtime(env=detect_env(), device=device, dims=dims, mesh=build_mesh(dims, device),
                 stage_dir=configs[0][1], group=dist.group.WORLD)
    results = {}
    for cfg, _ in configs:
        service = build_service(cfg, rt, TOKEN)
        if rank == 0:
            service.start()

            def talk(service=service, name=cfg.name):
                with Client(name, service.url, TOKEN, timeout_s=120, retries=0) as client:
                    try:
                        results[name] = conversation(client, name)
                    finally:
                        client.shutdown()
            thread = threading.Thread(target=talk)
            thread.start()
        service.run_world()
        if rank == 0:
            thread.join(60)
            service.stop()
    return results


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_two_process_service_answers_what_one_process_answers(tmp_path, rm_tokenizer_dir, layout):
    sft, rm = write_checkpoints(tmp_path, rm_tokenizer_dir)
    names = ["reward", "reference", "critic"]
    configs = [(service_config(name, tmp_path / layout, sft if name == "reference" else rm), tmp_path / name)
               for name in names]
    expected = {}
    for cfg, stage_dir in configs:
        running = Running(service_config(cfg.name, tmp_path / "single", cfg.settings.checkpoint), stage_dir)
        try:
            expected[cfg.name] = conversation(running.client, cfg.name)
        finally:
            running.close()
    got = run_distributed(_serve_in_world, 2, tmp_path, configs, LAYOUTS[layout])[0]
    for name in names:
        for key, value in expected[name].items():
            torch.testing.assert_close(got[name][key], value, atol=2e-5, rtol=2e-5, msg=f"{name} {key}")
