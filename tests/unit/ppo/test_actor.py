"""The actor's pieces: reproducible rollouts, log-probs consistent with the engine's
sampling, the composition of the PPO math, skipped steps counted, rows checked against a
model's limit, and the config's paper defaults."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import GenerationConfig, OptimConfig, ParallelConfig
from offline_rlhf.generation.engine import DecodeSession
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.train.schedule import build_optimizer
from ppo_baseline import algorithm
from ppo_baseline.actor import advantages, iteration_generation, policy_logprobs, sample, update_policy
from ppo_baseline.config import PPOAlgorithmConfig, PPOConfig
from ppo_baseline.models import check_sequences
from ppo_baseline.wire import Payload
from tests.fixtures import TINY, reference_model, runtime_for

GEN = GenerationConfig(greedy=False, max_new_tokens=6, batch_size=3, seed=7)


@pytest.fixture
def rt(tmp_path):
    return runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None, tmp_path)


def prompts():
    return [[1, 5, 9], [1, 7], [1, 4, 4, 4], [1, 8, 3]], [10, 11, 12, 13]


def test_a_rollout_depends_on_prompt_ids_and_iteration_not_on_the_batch(rt):
    model = reference_model(TINY)
    ids, pids = prompts()
    sampler = DecodeSession(model, rt.device, GEN)
    full = sample(sampler, ids, pids, iteration_generation(GEN, 3), 2, 0, rt)
    alone = sample(sampler, ids[2:3], pids[2:3], iteration_generation(GEN, 3), 2, 0, rt)
    width = int(alone.lengths[0])
    assert torch.equal(full.tokens[2, :width], alone.tokens[0, :width])
    assert torch.equal(full.mask[2, :width], alone.mask[0, :width])
    other = sample(DecodeSession(model, rt.device, GEN), ids, pids, iteration_generation(GEN, 4), 2, 0, rt)
    assert not torch.equal(full.tokens, other.tokens)
    assert full.mask[:, :2].sum() == 0
    assert int(full.mask.sum()) == int((full.lengths - torch.tensor([3, 2, 4, 3])).sum())


def test_old_logprobs_are_those_of_the_sampling_distribution(rt):
    model = reference_model(TINY)
    ids, pids = prompts()
    rollout = sample(DecodeSession(model, rt.device, GEN), ids, pids, iteration_generation(GEN, 0), 2, 0, rt)
    logp = policy_logprobs(model, rollout, rt, batch_size=3)
    with torch.no_grad():
        full = model(rollout.tokens).log_softmax(-1)
    row, t = 1, int(rollout.lengths[1]) - 1
    assert logp[row, t].item() == pytest.approx(full[row, t - 1, rollout.tokens[row, t]].item(), abs=1e-5)
    assert torch.all(logp[~rollout.mask] == 0)


def test_advantages_compose_the_ppo_math():
    mask = torch.tensor([[False, True, True, True]])
    logp, ref = torch.tensor([[0.0, -1.0, -2.0, -1.5]]), torch.tensor([[0.0, -1.5, -2.0, -1.0]])
    values, scores = torch.tensor([[0.0, 0.5, 0.2, 0.1]]), torch.tensor([2.0])
    cfg = PPOAlgorithmConfig(rollout_batch=1, minibatch=1, micro_batch=1, whiten_advantages=False)
    got = advantages(logp, ref, values, scores, mask, cfg)
    rewards, _ = algorithm.kl_penalized_rewards(logp, ref, scores, mask, 0.01)
    expected, returns = algorithm.gae(rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(got.advantages, expected)
    torch.testing.assert_close(got.returns, returns)
    assert got.rewards[0, 3].item() == pytest.approx(2.0 - 0.01 * (-0.5))


def test_a_policy_update_moves_the_weights_and_reports_metrics(rt):
    model = reference_model(TINY)
    ids, pids = prompts()
    rollout = sample(DecodeSession(model, rt.device, GEN), ids, pids, iteration_generation(GEN, 0), 2, 0, rt)
    old = policy_logprobs(model, rollout, rt, 4)
    adv = torch.where(rollout.mask, torch.randn(rollout.mask.shape, generator=torch.Generator().manual_seed(0)), 0.0)
    optimizer = build_optimizer(model.parameters(), OptimConfig(lr=1e-2), rt.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = model.output.weight.detach().clone()
    cfg = PPOAlgorithmConfig(rollout_batch=4, minibatch=2, micro_batch=1, epochs=2)
    metrics = update_policy(model, optimizer, scheduler, {**rollout.sequences(), "old_logp": old, "advantages": adv},
                            cfg, seed=1, iteration=0, grad_clip=1.0, rt=rt)
    assert not torch.equal(before, model.output.weight)
    assert {"loss", "approx_kl", "clip_frac", "entropy", "grad_norm"} <= set(metrics)
    assert metrics["approx_kl"] >= 0 and metrics["entropy"] > 0


def test_the_stage_config_has_the_papers_defaults_and_is_frozen(tmp_path):
    cfg = compose_stage("ppo", PPOConfig, [f"run_dir={tmp_path}"])
    assert (cfg.ppo.rollout_batch, cfg.ppo.minibatch, cfg.ppo.epochs) == (1024, 128, 1)
    assert (cfg.optim.lr, cfg.services.critic.optim.lr) == (5e-7, 9e-6)
    assert (cfg.ppo.kl_coef, cfg.ppo.lam, cfg.ppo.gamma) == (0.01, 0.95, 1.0)
    assert cfg.services.critic.checkpoint == f"{tmp_path}/rm/checkpoints"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ppo.kl_coef = 0.1
    with pytest.raises(ConfigError, match="ppo.minibatch"):
        compose_stage("ppo", PPOConfig, ["ppo.minibatch=100"])
    with pytest.raises(ConfigError, match="generation.greedy"):
        compose_stage("ppo", PPOConfig, ["generation.greedy=true"])
    with pytest.raises(ConfigError, match="^generation.stop: PPO rollouts end at EOS"):  # was silently ignored
        compose_stage("ppo", PPOConfig, ["generation.stop=[END]"])


def test_the_config_refuses_actor_layouts_it_cannot_run(tmp_path):
    for key in ("sequence_parallel", "loss_parallel"):
        with pytest.raises(ConfigError, match=rf"^parallel.{key}: is not supported by the PPO actor"):
            compose_stage("ppo", PPOConfig, [f"run_dir={tmp_path}", "parallel.tp=2", f"parallel.{key}=true"])
    with pytest.raises(ConfigError, match=r"^ppo.micro_batch: the actor's minibatch of 8 does not split into "
                                          r"micro-batches of 4 on 4 data-parallel ranks"):
        compose_stage("ppo", PPOConfig, [f"run_dir={tmp_path}", "parallel.dp=4", "ppo.minibatch=8",
                                         "ppo.micro_batch=4", "ppo.rollout_batch=16"])
    cfg = compose_stage("ppo", PPOConfig, [f"run_dir={tmp_path}", "ppo.minibatch=8", "ppo.micro_batch=4",
                                           "ppo.rollout_batch=16"])
    cfg.check_world(dp=2)  # 8 rows = 2 ranks x one micro-batch of 4
    with pytest.raises(ConfigError, match="on 4 data-parallel ranks"):
        cfg.check_world(dp=4)  # what the stage checks once torchrun has given it the world


def test_a_policy_update_counts_its_skipped_steps(rt):
    """A step whose gradient norm is not finite leaves the weights alone and is counted
    (the stage fails a run of mostly skipped steps)."""
    model = reference_model(TINY)
    ids, pids = prompts()
    rollout = sample(DecodeSession(model, rt.device, GEN), ids, pids, iteration_generation(GEN, 0), 2, 0, rt)
    old = policy_logprobs(model, rollout, rt, 4)
    optimizer = build_optimizer(model.parameters(), OptimConfig(lr=1e-2), rt.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cfg = PPOAlgorithmConfig(rollout_batch=4, minibatch=2, micro_batch=1, epochs=2)
    data = {**rollout.sequences(), "old_logp": old, "advantages": torch.where(rollout.mask, 1.0, 0.0)}
    taken = update_policy(model, optimizer, scheduler, data, cfg, 1, 0, 1.0, rt)
    assert taken["skipped_steps"] == 0 and math.isfinite(taken["grad_norm"])
    before = model.output.weight.detach().clone()
    data["advantages"] = torch.where(rollout.mask, float("nan"), 0.0)
    skipped = update_policy(model, optimizer, scheduler, data, cfg, 1, 1, 1.0, rt)
    assert skipped["skipped_steps"] == 4 and "grad_norm" not in skipped  # a skipped step's norm is not averaged in
    assert torch.equal(before, model.output.weight)


def test_a_row_beyond_a_models_limit_is_refused_naming_that_limit():
    rows = Payload({"tokens": torch.ones(2, 6, dtype=torch.long), "mask": torch.zeros(2, 6, dtype=torch.bool),
                    "lengths": torch.tensor([6, 4])})
    check_sequences(rows, vocab_size=8, max_len=6, limit="the critic's max_seq_len")
    with pytest.raises(ValueError, match=r"^sequences of 6 tokens exceed the reward model's recorded training "
                                         r"length \(5 tokens\)$"):
        check_sequences(rows, vocab_size=8, max_len=5, limit="the reward model's recorded training length")
