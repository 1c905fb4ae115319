"""A run that learned nothing fails instead of writing DONE: too many skipped steps or
non-finite final weights (`check_learned`, called by `train` after every step), and a
step with nothing to learn from does not move the weights."""

import math

import pytest
import torch

from offline_rlhf.checkpoint import TrainState
from offline_rlhf.config.schema import OptimConfig, ParallelConfig, TrainConfig
from offline_rlhf.data.alignment_dataset import RewardedSequence
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.stages.align import collate_rewarded
from offline_rlhf.stages.sft import sft_task
from offline_rlhf.train.loop import Task, TrainingFailed, check_learned, train_step
from offline_rlhf.train.schedule import build_optimizer
from tests.fixtures import TINY, reference_model, runtime_for, sft_sequences


def rt():
    return runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None)


def state(step, skipped):
    return TrainState(step=step, data_position={"samples_consumed": 8 * step, "skipped_steps": skipped})


def test_more_skipped_steps_than_allowed_fail_with_the_reason():
    with pytest.raises(TrainingFailed) as err:
        check_learned(reference_model(), state(4, 3), 4, TrainConfig(max_skipped_fraction=0.5), rt())
    message = str(err.value)
    assert message.startswith("train.max_skipped_fraction: 3 of 4 steps (of 4 planned) were skipped for a "
                              "non-finite loss or gradient norm, more than 0.5 of the run")
    assert "no final checkpoint or DONE was written; lower optim.lr" in message and "\n" not in message


def test_failure_comes_as_soon_as_it_is_certain_and_not_before():
    cfg = TrainConfig(max_skipped_fraction=0.5)
    check_learned(reference_model(), state(5, 5), 10, cfg, rt())  # 5 of 10 may still end at 50%
    with pytest.raises(TrainingFailed):
        check_learned(reference_model(), state(6, 6), 10, cfg, rt())
    check_learned(reference_model(), state(10, 10), 10, TrainConfig(max_skipped_fraction=1.0), rt())


def test_non_finite_final_weights_fail():
    model = reference_model()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    check_learned(model, state(3, 0), 10, TrainConfig(), rt())  # checked at the last step only
    with pytest.raises(TrainingFailed, match="^optim: the final weights hold NaN or Inf"):
        check_learned(model, state(10, 0), 10, TrainConfig(), rt())


def test_a_step_with_nothing_to_learn_from_leaves_the_weights():
    """An all-filtered global batch (normalizer 0) gave zero gradients, yet AdamW's momentum
    and weight decay moved every weight."""
    model = reference_model()
    optimizer = build_optimizer(model.parameters(), OptimConfig(lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    batches = [collate_rewarded([RewardedSequence(s, 0.0) for s in sft_sequences(2)], pad_id=0)]
    train_step(sft_task(True), model, optimizer, batches, rt(), grad_clip=1.0)  # momentum is now non-zero
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nothing = Task(loss=lambda m, b, n: (sft_task(True).loss(m, b, n)[0] * 0.0, {}), normalizer=lambda b: 0,
                   tokens=sft_task(True).tokens)
    train_step(nothing, model, optimizer, batches, rt(), grad_clip=1.0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def overflowing(task: Task, rank: int = 0, of_rank: int = 0) -> Task:
    """`task` whose loss on data-parallel rank `of_rank` gains an infinite constant: its
    gradient stays finite (the constant has none), its loss is not."""
    def loss(model, batch, normalizer):
        value, metrics = task.loss(model, batch, normalizer)
        return (value + math.inf, metrics) if rank == of_rank else (value, metrics)
    return Task(loss=loss, normalizer=task.normalizer, tokens=task.tokens)


def test_a_step_whose_loss_is_not_finite_is_skipped_though_its_gradient_is():
    """train_step skipped a step for a non-finite gradient norm only: an overflowing loss
    with a finite gradient (a clipped error, a constant) stepped."""
    model = reference_model()
    optimizer = build_optimizer(model.parameters(), OptimConfig(lr=1e-2), torch.device("cpu"))
    batches = [collate_rewarded([RewardedSequence(s, 0.0) for s in sft_sequences(2)], pad_id=0)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics, _ = train_step(overflowing(sft_task(True)), model, optimizer, batches, rt(), grad_clip=1.0)
    assert metrics["skipped_step"] == 1 and math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    metrics, _ = train_step(sft_task(True), model, optimizer, batches, rt(), grad_clip=1.0)
    assert metrics["skipped_step"] == 0 and not all(torch.equal(p, before[n]) for n, p in model.named_parameters())
