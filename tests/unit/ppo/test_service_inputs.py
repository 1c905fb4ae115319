"""The PPO services over real HTTP on 127.0.0.1 refuse NaN or infinite numbers: in a
request with a 400 naming the field, in what they compute with a 500 naming it (the actor's
client then stops with that message); the critic's save, load and train take only a step
that is a non-negative integer below MAX_STEP, and its train only returns and old values of
magnitude up to MAX_TARGET; a refused or failed training request changes nothing of the
critic's step, weights or schedule."""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from offline_rlhf.checkpoint import REWARD_STATS, CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.parallel.dims import ParallelDims
from ppo_baseline.config import ServiceOptimConfig
from ppo_baseline.models import SAVED, SCORES, STEP, TRAINED, VALUES
from ppo_baseline.service import NonFiniteAnswer, ServiceError
from ppo_baseline.services import MAX_STEP, MAX_TARGET, Critic, build_service
from ppo_baseline.wire import Payload, encode
from tests.fixtures import reference_model, runtime_for
from tests.synthetic_preferences import MODEL
from tests.unit.ppo.tiny_models import STATS, TOKEN, Running, rollout, service_config, write_checkpoints

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def start(tmp_path, rm_tokenizer_dir):
    """start(name, rm=None): service `name` on the tiny checkpoints (or the reward model `rm`)."""
    sft, default_rm = write_checkpoints(tmp_path, rm_tokenizer_dir)
    started = []

    def run(name, rm=None):
        checkpoint = sft if name == "reference" else rm or default_rm
        started.append(Running(service_config(name, tmp_path, checkpoint), tmp_path / name))
        return started[-1]

    yield run
    for service in started:
        service.close()


def nan_reward_model(root, tokenizer_dir):
    """A reward-model checkpoint whose weights are all NaN (a diverged `orlhf rm`)."""
    model = reference_model(MODEL, "value", seed=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(math.nan)
    path = root / "nan_rm" / "checkpoints"
    save_checkpoint(path, model, CheckpointMeta(MODEL, "value", TrainState(step=1), metadata={REWARD_STATS: STATS}),
                    tokenizer_dir=tokenizer_dir)
    return path


def post(service, endpoint, payload):
    with httpx.Client(base_url=service.service.url, timeout=60) as http:
        return http.post(f"/{endpoint}", content=encode(payload), headers=AUTH)


def train_payload(service, batch, step=0, **tensors):
    values = service.client.call("values", Payload(batch), VALUES).tensors["values"]
    return Payload({**batch, "returns": values + 1.0, "old_values": values, **tensors}, {"step": step})


@pytest.mark.parametrize("field,value", [("returns", math.nan), ("returns", math.inf), ("old_values", -math.inf)])
def test_a_non_finite_tensor_in_a_request_is_a_400_naming_it(start, field, value):
    critic = start("critic")
    batch = rollout(rows=8)
    before = critic.client.call("values", Payload(batch), VALUES).tensors["values"]
    good = train_payload(critic, batch)
    bad = good.tensors[field].clone()
    bad[2, 5] = value
    response = post(critic, "train", Payload({**good.tensors, field: bad}, good.meta))
    assert response.status_code == 400, response.text
    assert response.text == f"ValueError: NaN or infinite values in the request's tensor {field!r}"
    torch.testing.assert_close(critic.client.call("values", Payload(batch), VALUES).tensors["values"], before)
    assert critic.service.step == 0  # nothing trained


def test_a_non_finite_metadata_number_in_a_request_is_a_400_naming_it(start):
    critic = start("critic")
    good = train_payload(critic, rollout(rows=8))
    response = post(critic, "train", Payload(good.tensors, {"step": 0, "scale": math.nan}))
    assert (response.status_code, response.text) == (400, "ValueError: NaN or infinite values in the request's "
                                                           "metadata 'scale'")


@pytest.mark.parametrize("field,value", [("returns", 1e30), ("returns", -2e6), ("old_values", 1e7)])
def test_returns_or_old_values_beyond_the_bound_are_a_400_that_changes_nothing(start, field, value):
    """1e30 is finite, its square is not: the critic answered 500 after its step had moved."""
    critic = start("critic")
    batch = rollout(rows=8)
    good = train_payload(critic, batch)
    bad = good.tensors[field].clone()
    bad[2, 3] = value
    response = post(critic, "train", Payload({**good.tensors, field: bad}, good.meta))
    assert (response.status_code, response.text) == (400, f"ValueError: tensor {field!r} holds a value of magnitude "
                                                           f"{abs(value):.3g}; the critic takes |{field}| <= 1e+06")
    assert critic.service.step == 0
    torch.testing.assert_close(critic.client.call("values", Payload(batch), VALUES).tensors["values"],
                               good.tensors["old_values"], atol=0, rtol=0)
    at_bound = good.tensors[field].clone()
    at_bound[2, 3] = math.copysign(MAX_TARGET, value)
    trained = critic.client.call("train", Payload({**good.tensors, field: at_bound}, good.meta), TRAINED)
    assert trained.meta["step"] == 1 and trained.meta["critic_skipped_steps"] == 0


def test_a_critic_whose_training_goes_non_finite_answers_500_and_its_step_stays(start, tmp_path, rm_tokenizer_dir):
    critic = start("critic", rm=nan_reward_model(tmp_path, rm_tokenizer_dir))
    zeros = torch.zeros(8, 12)
    response = post(critic, "train", Payload({**rollout(rows=8), "returns": zeros, "old_values": zeros}, {"step": 0}))
    assert (response.status_code, response.text) == (
        500, "NonFiniteAnswer: critic /train computed a NaN or infinite value_loss at step 0; its steps with a "
             "non-finite loss were skipped and its schedule and step are as before")
    assert critic.service.step == 0


def test_a_failed_update_puts_the_critics_schedule_back(tmp_path, rm_tokenizer_dir):
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None, tmp_path / "local")
    moving = ServiceOptimConfig(lr=1e-3, schedule="cosine", warmup_steps=3)  # every step changes the rate
    local = Critic(service_config("critic", tmp_path, nan_reward_model(tmp_path, rm_tokenizer_dir), optim=moving), rt)
    schedule, rates = local.scheduler.state_dict(), [group["lr"] for group in local.optimizer.param_groups]
    zeros = torch.zeros(8, 12)
    with pytest.raises(NonFiniteAnswer, match="value_loss at step 3"):
        local.train(Payload({**rollout(rows=8), "returns": zeros, "old_values": zeros}, {"step": 3}))
    assert local.scheduler.state_dict() == schedule
    assert [group["lr"] for group in local.optimizer.param_groups] == rates


def test_non_finite_values_from_a_diverged_critic_are_a_500_naming_them(start, tmp_path, rm_tokenizer_dir):
    critic = start("critic", rm=nan_reward_model(tmp_path, rm_tokenizer_dir))
    response = post(critic, "values", Payload(rollout()))
    assert response.status_code == 500
    assert response.text == ("NonFiniteAnswer: critic /values computed NaN or infinite values in its answer's "
                             "tensor 'values'")
    with pytest.raises(ServiceError, match=r"HTTP 500: NonFiniteAnswer: critic /values"):
        critic.client.call("values", Payload(rollout()), VALUES)


def test_non_finite_rewards_from_a_diverged_reward_model_are_a_500(start, tmp_path, rm_tokenizer_dir):
    reward = start("reward", rm=nan_reward_model(tmp_path, rm_tokenizer_dir))
    with pytest.raises(ServiceError, match=r"/score: HTTP 500: ConfigError: reward model: gave a non-finite reward "
                                           r"for 5 of 5 sequences"):
        reward.client.call("score", Payload(rollout()), SCORES)
    assert reward.client.health()["ready"]


@pytest.mark.parametrize("key", ["mean", "std"])
def test_a_reward_model_with_non_finite_statistics_does_not_start(tmp_path, rm_tokenizer_dir, key):
    _, rm = write_checkpoints(tmp_path, rm_tokenizer_dir, stats={**STATS, key: math.nan})
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None, tmp_path / "reward")
    with pytest.raises(ConfigError, match=r"^services.reward.checkpoint: the reward statistics of .* are not finite"):
        build_service(service_config("reward", tmp_path, rm), rt, TOKEN)


@pytest.mark.parametrize("step", [-5, -1, MAX_STEP, 10**30, True, False])
def test_save_and_load_take_only_a_non_negative_integer_step(start, tmp_path, step):
    critic = start("critic")
    root = tmp_path / "ppo" / "critic" / "checkpoints"
    for endpoint in ("save", "load"):
        response = post(critic, endpoint, Payload(meta={"step": step}))
        assert response.status_code == 400, (endpoint, response.text)
        assert response.text == (f"ValueError: metadata 'step' must be an integer in [0, {MAX_STEP}), "
                                 f"got {step!r}")
    assert not root.exists() or not list(root.iterdir())  # no step folder was written
    train = train_payload(critic, rollout(rows=8), step=step)
    assert post(critic, "train", train).status_code == 400
    assert critic.service.step == 0


def test_a_valid_step_still_saves_and_loads(start, tmp_path):
    critic = start("critic")
    saved = critic.client.call("save", Payload(meta={"step": MAX_STEP - 1}), SAVED)
    assert saved.meta["path"] == str(tmp_path / "ppo" / "critic" / "checkpoints" / f"step_{MAX_STEP - 1}")
    assert critic.client.call("load", Payload(meta={"step": MAX_STEP - 1}), STEP).meta["step"] == MAX_STEP - 1
