"""A critic whose steps are skipped (non-finite loss or gradient norm) counts against
ppo.max_skipped_fraction: the critic service answers how many of its steps it skipped,
rank 0 shares that count with every actor rank, and every rank fails alike (a rank-0-only
failure would leave the others waiting in a collective)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.parallel.distributed import detect_env, device_for
from offline_rlhf.parallel.parallelize import build_mesh
from offline_rlhf.train.loop import TrainingFailed, train_step
from ppo_baseline.config import PPOAlgorithmConfig
from ppo_baseline.models import TRAINED, VALUES, shifted_values
from ppo_baseline.services import value_task
from ppo_baseline.stage import SKIPPED, check_learned, count_from_main
from ppo_baseline.wire import Payload
from tests.distributed.launch import run_distributed
from tests.fixtures import TINY, reference_model, runtime_for
from tests.synthetic_preferences import MODEL
from tests.unit.ppo.tiny_models import PPO, Running, rollout, service_config, write_skipping_critic

# Two iterations of the tiny PPO's 2 critic steps each: more than half skipped fails the run.
RUN = PPOAlgorithmConfig(iterations=2, rollout_batch=PPO.rollout_batch, minibatch=PPO.minibatch,
                         micro_batch=PPO.micro_batch)
STEPS_PER_ITERATION = PPO.rollout_batch // PPO.minibatch
CRITIC_FAILED = ("ppo.max_skipped_fraction: 4 of the 4 critic steps so far (of 4 planned) were skipped for a "
                 "non-finite loss or gradient norm, more than 0.5 of the run, so the critic learned little or nothing; "
                 "no final checkpoint or DONE was written; lower services.critic.optim.lr or check the rewards "
                 "(metrics.jsonl: train/critic_skipped_steps)")


def test_a_critic_whose_gradients_overflow_answers_that_it_skipped_every_step(tmp_path, rm_tokenizer_dir):
    """The critic's /train answer carries its count (the actor's TRAINED schema requires it);
    its values stay finite and its weights unchanged."""
    critic = write_skipping_critic(tmp_path / "critic" / "checkpoints", rm_tokenizer_dir)
    service = Running(service_config("critic", tmp_path, critic), tmp_path / "critic")
    try:
        batch = rollout(rows=PPO.rollout_batch)
        values = service.client.call("values", Payload(batch), VALUES).tensors["values"]
        assert bool(torch.isfinite(values).all()) and bool(values.abs().sum() > 0)
        returns = torch.where(batch["mask"], values + 1.0, 0.0)
        trained = service.client.call("train", Payload({**batch, "returns": returns, "old_values": values},
                                                       {"step": 0}), TRAINED)
        assert trained.meta["critic_skipped_steps"] == STEPS_PER_ITERATION
        assert "critic_grad_norm" not in trained.meta  # no step was taken
        torch.testing.assert_close(service.client.call("values", Payload(batch), VALUES).tensors["values"], values,
                                   atol=0, rtol=0)
    finally:
        service.close()


def _decide_in_world(rank: int, world_size: int, answered: float) -> str:
    """Two iterations of the actor's bookkeeping on every rank of a gloo world: rank 0 alone
    holds the critic's answer; returns the failure each rank raised ("" if none)."""
    dims = ParallelDims.build(ParallelConfig(), world_size, TINY)
    device = device_for(detect_env())
    rt = replace(runtime_for(dims, build_mesh(dims, device), Path("/tmp")), group=dist.group.WORLD)
    model, skipped = reference_model(TINY), dict.fromkeys(SKIPPED, 0)
    try:
        for done in (1, 2):
            skipped["critic_skipped_steps"] += int(count_from_main(answered if rank == 0 else None, rt))
            check_learned(model, skipped, done, RUN, STEPS_PER_ITERATION, rt)
    except TrainingFailed as failed:
        return str(failed)
    return ""


@pytest.mark.slow  # two processes
def test_every_rank_fails_alike_on_the_critics_skipped_steps(tmp_path):
    assert run_distributed(_decide_in_world, 2, tmp_path, float(STEPS_PER_ITERATION)) == [CRITIC_FAILED] * 2
    assert run_distributed(_decide_in_world, 2, tmp_path, 1.0) == ["", ""]  # half the steps may be skipped


def test_a_step_whose_value_loss_overflows_is_skipped_though_its_gradient_is_finite(tmp_path):
    """Where the clipped error wins its gradient is 0, so an old value of 1e20 makes the loss
    infinite and leaves the gradient finite: train_step took that step before."""
    model = reference_model(MODEL, "value", seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = rollout(rows=4)
    with torch.no_grad():
        values = shifted_values(model(batch["tokens"]))
    old_values = values.clone()
    old_values[0, 3] = 1e20  # position 3: every row's first response token
    data = {**batch, "returns": torch.where(batch["mask"], values + 1.0, 0.0), "old_values": old_values}
    before = [parameter.detach().clone() for parameter in model.parameters()]
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None, tmp_path)
    metrics, _ = train_step(value_task(0.2), model, optimizer, [data], rt, grad_clip=1.0)
    assert metrics["loss"] == math.inf and metrics["skipped_step"] == 1
    assert all(torch.equal(now, then) for now, then in zip(model.parameters(), before))
    metrics, _ = train_step(value_task(0.2), model, optimizer, [{**data, "old_values": values}], rt, grad_clip=1.0)
    assert math.isfinite(metrics["loss"]) and metrics["skipped_step"] == 0  # the same batch, bounded, trains
    assert not all(torch.equal(now, then) for now, then in zip(model.parameters(), before))
