"""A rollout's rows and what the actor accepts back: every row samples its own stream (a
prompt drawn twice in one rollout gets two responses), the services' answers must be
finite, and a run of skipped policy or critic steps or non-finite weights fails (the counts
resume from the actor's checkpoint); metrics rows hold no NaN."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import GenerationConfig, OptimConfig, ParallelConfig
from offline_rlhf.generation.engine import DecodeSession
from offline_rlhf.generation.sampling import stream_id
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.train.loop import SampleStream, TrainingFailed
from offline_rlhf.train.schedule import build_optimizer, build_scheduler
from ppo_baseline.actor import iteration_generation, rollout_streams, sample
from ppo_baseline.config import PPOAlgorithmConfig
from ppo_baseline.stage import _resume, check_answers, check_learned, defined
from tests.fixtures import TINY, reference_model, runtime_for

GEN = GenerationConfig(greedy=False, max_new_tokens=12, batch_size=8, seed=7)
PROMPTS, IDS = [[1, 5, 9], [1, 7], [1, 4, 4, 4]], [10, 11, 12]


@pytest.fixture
def rt(tmp_path):
    return runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None, tmp_path)


def rows(rollout) -> list[tuple[int, ...]]:
    return [tuple(rollout.tokens[k, :int(rollout.lengths[k])].tolist()) for k in range(len(rollout.lengths))]


def test_a_prompt_drawn_twice_in_a_rollout_gets_independent_responses(rt):
    """8 rows over 3 prompts (rollout_batch above the prompt count): each prompt is drawn 2-3
    times, once per epoch of the prompt stream. Was: its rows were identical samples."""
    stream, model = SampleStream(len(PROMPTS), 1234), reference_model(TINY)
    chosen, streams = rollout_streams(stream, IDS, 0, 8)
    assert chosen == stream.take(0, 8) and len(set(streams)) == 8
    assert streams[:3] == [stream_id(IDS[i], 0) for i in chosen[:3]]  # epoch 0: the streams of before
    rollout = sample(DecodeSession(model, rt.device, GEN), [PROMPTS[i] for i in chosen], streams,
                     iteration_generation(GEN, 0), 2, 0, rt)
    got = rows(rollout)
    for prompt in set(chosen):
        same = [got[k] for k in range(8) if chosen[k] == prompt]
        assert len(same) >= 2 and len(set(same)) == len(same), (prompt, same)
    # A row depends on its place in the stream only: a share of the rows (a DP replica's,
    # or a resumed iteration's) draws the same responses.
    later, later_streams = rollout_streams(stream, IDS, 5, 3)
    assert (later, later_streams) == (chosen[5:], streams[5:])
    alone = sample(DecodeSession(model, rt.device, GEN), [PROMPTS[i] for i in later], later_streams,
                   iteration_generation(GEN, 0), 2, 0, rt)
    assert rows(alone) == got[5:]


def test_non_finite_answers_fail_naming_the_service_and_the_iteration():
    answer = {"scores": torch.ones(2), "raw": torch.ones(2), "ref_logp": torch.zeros(2, 3),
              "values": torch.zeros(2, 3)}
    check_answers(answer, 0)
    answer["values"][1, 2] = float("nan")
    with pytest.raises(ConfigError, match=r"^services.critic.checkpoint: the critic service answered 1 non-finite "
                                          r"values \(of 6\) at iteration 4; no DONE was written"):
        check_answers(answer, 3)
    answer["values"][1, 2], answer["scores"][0] = 0.0, float("inf")
    with pytest.raises(ConfigError, match=r"^services.reward.checkpoint: the reward service answered 1 non-finite "
                                          "rewards"):
        check_answers(answer, 0)


def counts(policy: int = 0, critic: int = 0) -> dict[str, int]:
    """The running counts of skipped steps, as the stage keeps them."""
    return {"skipped_steps": policy, "critic_skipped_steps": critic}


def test_mostly_skipped_policy_steps_or_non_finite_final_weights_fail_the_run(rt):
    model, ppo = reference_model(TINY), PPOAlgorithmConfig(iterations=2, rollout_batch=8, minibatch=8, micro_batch=8)
    check_learned(model, skipped=counts(4, 4), done=2, ppo=ppo, steps_per_iteration=4, rt=rt)  # half may be skipped
    with pytest.raises(TrainingFailed, match=r"^ppo.max_skipped_fraction: 5 of the 8 policy steps so far \(of 8 "
                                             r"planned\) were skipped for a non-finite loss or gradient norm, "
                                             r"more than 0.5"):
        check_learned(model, skipped=counts(5), done=2, ppo=ppo, steps_per_iteration=4, rt=rt)
    check_learned(model, skipped=counts(5), done=2, ppo=replace(ppo, max_skipped_fraction=0.75),
                  steps_per_iteration=4, rt=rt)
    with torch.no_grad():
        model.output.weight[0, 0] = float("nan")
    check_learned(model, skipped=counts(), done=1, ppo=ppo, steps_per_iteration=4, rt=rt)  # checked at the end only
    with pytest.raises(TrainingFailed, match="^optim.lr: the final policy weights hold NaN or Inf"):
        check_learned(model, skipped=counts(), done=2, ppo=ppo, steps_per_iteration=4, rt=rt)


def test_mostly_skipped_critic_steps_fail_the_run_naming_the_critics_learning_rate(rt):
    """Was: a critic whose every step was skipped logged critic_skipped_steps and the run
    wrote DONE. Its planned steps are the policy's (the same minibatches of each rollout)."""
    model, ppo = reference_model(TINY), PPOAlgorithmConfig(iterations=2, rollout_batch=8, minibatch=4, micro_batch=4,
                                                           epochs=2)
    check_learned(model, skipped=counts(critic=4), done=1, ppo=ppo, steps_per_iteration=4, rt=rt)  # half may be
    with pytest.raises(TrainingFailed) as failed:
        check_learned(model, skipped=counts(critic=5), done=2, ppo=ppo, steps_per_iteration=4, rt=rt)
    assert str(failed.value) == (
        "ppo.max_skipped_fraction: 5 of the 8 critic steps so far (of 8 planned) were skipped for a non-finite "
        "loss or gradient norm, more than 0.5 of the run, so the critic learned little or nothing; no final "
        "checkpoint or DONE was written; lower services.critic.optim.lr or check the rewards (metrics.jsonl: "
        "train/critic_skipped_steps)")
    check_learned(model, skipped=counts(critic=5), done=2, ppo=replace(ppo, max_skipped_fraction=0.75),
                  steps_per_iteration=4, rt=rt)


def test_the_skipped_counts_resume_from_the_actors_checkpoint(rt, tmp_path):
    """An actor checkpoint keeps both counts; one written before the critic's was kept
    resumes that count at 0."""
    model, optim = reference_model(TINY), OptimConfig(lr=1e-3)
    optimizer = build_optimizer(model.parameters(), optim, rt.device)
    scheduler = build_scheduler(optimizer, 8, optim)
    root = tmp_path / "checkpoints"

    def save(step: int, position: dict[str, int]) -> None:
        save_checkpoint(root, model, CheckpointMeta(TINY, "lm", TrainState(step=step, data_position=position),
                                                    scheduler=scheduler.state_dict()), optimizer=optimizer)

    assert _resume(root, model, optimizer, scheduler, rt) == (0, counts())
    save(1, {"skipped_steps": 3})
    assert _resume(root, model, optimizer, scheduler, rt) == (1, counts(3, 0))
    save(2, counts(1, 5))
    assert _resume(root, model, optimizer, scheduler, rt) == (2, counts(1, 5))


def test_a_metrics_row_leaves_out_undefined_values_so_it_is_strict_json():
    row = defined({"reward_mean": 0.5, "explained_variance": math.nan, "grad_norm": math.inf, "skipped_steps": 1.0})
    assert row == {"reward_mean": 0.5, "skipped_steps": 1.0}
    json.loads(json.dumps(row), parse_constant=lambda constant: pytest.fail(f"{constant} in a row"))
