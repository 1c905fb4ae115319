"""The reward, reference and critic services over real HTTP on 127.0.0.1 answer what a
direct computation with the same weights gives, refuse bad requests with a 4xx and keep
serving."""

from __future__ import annotations

import httpx
import pytest
import torch

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.train.loop import TrainingFailed
from ppo_baseline.models import LOGPROBS, SAVED, SCORES, STEP, TRAINED, VALUES
from ppo_baseline.services import Critic, build_service
from ppo_baseline.wire import Payload, encode
from tests.fixtures import reference_model, runtime_for
from tests.synthetic_preferences import MODEL
from tests.unit.ppo.tiny_models import STATS, TOKEN, Running, rollout, service_config, write_checkpoints


@pytest.fixture
def checkpoints(tmp_path, rm_tokenizer_dir):
    return write_checkpoints(tmp_path, rm_tokenizer_dir)


@pytest.fixture
def running(tmp_path, checkpoints):
    started = []

    def start(name):
        sft, rm = checkpoints
        service = Running(service_config(name, tmp_path, sft if name == "reference" else rm), tmp_path / name)
        started.append(service)
        return service

    yield start
    for service in started:
        service.close()


def test_reward_is_the_value_at_the_last_token_normalized_by_the_stored_statistics(running):
    batch = rollout()
    answer = running("reward").client.call("score", Payload(batch), SCORES)
    values = reference_model(MODEL, "value", seed=1)(batch["tokens"])
    raw = values[torch.arange(5), batch["lengths"] - 1]
    torch.testing.assert_close(answer.tensors["raw"], raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(answer.tensors["rewards"], (raw - STATS["mean"]) / STATS["std"], atol=1e-5, rtol=1e-5)


def test_reference_logprobs_are_the_sft_models_on_response_tokens(running):
    batch = rollout()
    answer = running("reference").client.call("logprobs", Payload(batch), LOGPROBS).tensors["logprobs"]
    logp = reference_model(MODEL, "lm", seed=0)(batch["tokens"]).log_softmax(-1)
    expected = torch.zeros(5, 12)
    expected[:, 1:] = logp[:, :-1].gather(-1, batch["tokens"][:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(answer, torch.where(batch["mask"], expected, 0.0), atol=1e-5, rtol=1e-5)


def test_critic_values_then_training_match_an_in_process_critic(running, tmp_path, checkpoints):
    batch = rollout(rows=8)
    service = running("critic")
    values = service.client.call("values", Payload(batch), VALUES).tensors["values"]
    expected = torch.zeros(8, 12)
    expected[:, 1:] = reference_model(MODEL, "value", seed=1)(batch["tokens"])[:, :-1]
    torch.testing.assert_close(values, torch.where(batch["mask"], expected, 0.0), atol=1e-5, rtol=1e-5)

    returns = torch.where(batch["mask"], torch.randn(8, 12, generator=torch.Generator().manual_seed(3)), 0.0)
    train = Payload({**batch, "returns": returns, "old_values": values}, {"step": 0})
    trained = service.client.call("train", train, TRAINED)
    assert trained.meta["step"] == 1 and trained.meta["value_loss"] > 0

    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None, tmp_path / "local")
    local = Critic(service_config("critic", tmp_path / "local", checkpoints[1]), rt)
    local.train(train)
    after = service.client.call("values", Payload(batch), VALUES).tensors["values"]
    assert not torch.allclose(after, values)
    torch.testing.assert_close(after, torch.where(batch["mask"], local_values(local, batch), 0.0), atol=1e-6,
                               rtol=1e-6)


def local_values(critic, batch):
    with torch.no_grad():
        out = critic.model(batch["tokens"])
    expected = torch.zeros_like(out)
    expected[:, 1:] = out[:, :-1]
    return expected


def test_critic_save_and_load_restore_weights_and_optimizer(running, tmp_path):
    batch = rollout(rows=8)
    service = running("critic")
    values = service.client.call("values", Payload(batch), VALUES).tensors["values"]
    train = Payload({**batch, "returns": values + 1.0, "old_values": values}, {"step": 0})
    service.client.call("train", train, TRAINED)
    saved = service.client.call("save", Payload(meta={"step": 1}), SAVED)
    assert saved.meta["path"].endswith("step_00000001")
    first = service.client.call("train", Payload(train.tensors, {"step": 1}), TRAINED).meta["value_loss"]
    after_first = service.client.call("values", Payload(batch), VALUES).tensors["values"]
    service.client.call("load", Payload(meta={"step": 1}), STEP)
    again = service.client.call("train", Payload(train.tensors, {"step": 1}), TRAINED).meta["value_loss"]
    assert again == pytest.approx(first, rel=1e-6)
    torch.testing.assert_close(service.client.call("values", Payload(batch), VALUES).tensors["values"], after_first)


def test_a_critic_with_non_finite_weights_refuses_to_save(tmp_path, checkpoints):
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None, tmp_path / "local")
    critic = Critic(service_config("critic", tmp_path / "local", checkpoints[1]), rt)
    with torch.no_grad():
        next(critic.model.parameters())[0] = float("inf")
    with pytest.raises(TrainingFailed, match="the critic's weights are not finite after iteration 3; its checkpoint "
                                             "was not written; lower services.critic.optim.lr"):
        critic.save(3)
    assert not critic.root.exists()


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_service_keeps_serving(running):
    service = running("reference")
    url = service.service.url
    good = rollout()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cases = {
        "no token": (encode(Payload(good)), {}, 401),
        "wrong token": (encode(Payload(good)), {"Authorization": "Bearer nope"}, 401),
        "garbage": (b"\x00garbage" * 10, auth, 400),
        "wrong dtype": (encode(Payload({**good, "tokens": good["tokens"].int()})), auth, 400),
        "shape mismatch": (encode(Payload({**good, "mask": good["mask"][:, :5]})), auth, 400),
        "token out of range": (encode(Payload({**good, "tokens": good["tokens"] + 1000})), auth, 400),
        "mask on padding": (encode(Payload({**good, "mask": torch.ones_like(good["mask"])})), auth, 400),
        "oversized": (b"\x00" * (2**20 + 1), auth, 413),
    }
    with httpx.Client(base_url=url, timeout=30) as http:
        for name, (body, headers, status) in cases.items():
            response = http.post("/logprobs", content=body, headers=headers)
            assert response.status_code == status, (name, response.text)
        assert http.post("/values", content=encode(Payload(good)), headers=auth).status_code == 404
    answer = service.client.call("logprobs", Payload(good), LOGPROBS)
    assert answer.tensors["logprobs"].shape == (5, 12)
    assert service.client.health()["ready"]


def test_a_reward_model_without_statistics_is_a_loud_error(tmp_path, rm_tokenizer_dir):
    _, rm = write_checkpoints(tmp_path, rm_tokenizer_dir, stats=None)
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None, tmp_path / "reward")
    with pytest.raises(ConfigError, match="stores no reward statistics"):
        build_service(service_config("reward", tmp_path, rm), rt, TOKEN)
