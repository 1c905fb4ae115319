"""Micro-batching and accumulation do not change the step: loss normalized by global tokens."""

import torch

from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.data.batching import collate_sequences
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.stages.sft import sft_task
from offline_rlhf.train.loop import SampleStream, train_step
from tests.fixtures import TINY, reference_model, runtime_for, sft_sequences


def sgd_step(sequences, micro_batch, model=None):
    """One SFT step over `sequences` cut into micro-batches; returns (metrics, weights)."""
    model = model or reference_model()
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None)
    batches = [collate_sequences(sequences[i:i + micro_batch], pad_id=0) for i in range(0, len(sequences), micro_batch)]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics, tokens = train_step(sft_task(packed=True), model, optimizer, batches, rt, grad_clip=100.0)
    return metrics, {n: p.detach().clone() for n, p in model.named_parameters()}, tokens


def test_micro_batch_1_x_4_equals_micro_batch_4_x_1():
    sequences = sft_sequences(4)
    accumulated, weights_acc, tokens_acc = sgd_step(sequences, micro_batch=1)
    whole, weights_whole, tokens_whole = sgd_step(sequences, micro_batch=4)
    assert abs(accumulated["loss"] - whole["loss"]) < 1e-5
    assert tokens_acc == tokens_whole == sum(len(s) for s in sequences)
    for name, weight in weights_whole.items():
        torch.testing.assert_close(weights_acc[name], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_loss_is_token_weighted_not_batch_averaged():
    """Per-micro-batch means averaged would weight a short sequence like a long one."""
    sequences = sft_sequences(4)
    metrics, _, _ = sgd_step(sequences, micro_batch=1)
    per_sequence = [sgd_step([s], micro_batch=1)[0]["loss"] for s in sequences]
    predicted = [sum(1 for label in s.labels[1:] if label != -100) for s in sequences]
    weighted = sum(loss * n for loss, n in zip(per_sequence, predicted)) / sum(predicted)
    assert abs(metrics["loss"] - weighted) < 1e-5
    assert abs(metrics["loss"] - sum(per_sequence) / 4) > 1e-4


def test_sample_stream_is_epoch_permutations():
    stream = SampleStream(5, seed=3)
    first_epoch, second_epoch = stream.take(0, 5), stream.take(5, 5)
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(5))
    assert first_epoch != second_epoch
    assert stream.take(3, 4) == first_epoch[3:] + second_epoch[:2]
    assert SampleStream(5, seed=3).take(0, 10) == first_epoch + second_epoch


def test_non_finite_gradients_skip_the_step():
    from offline_rlhf.train.loop import Task

    model = reference_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nan_task = Task(loss=lambda m, b, n: (sft_task(True).loss(m, b, n)[0] * float("nan"), {}),
                    normalizer=sft_task(True).normalizer, tokens=sft_task(True).tokens)
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None)
    batches = [collate_sequences(sft_sequences(2), pad_id=0)]
    metrics, _ = train_step(nan_task, model, torch.optim.SGD(model.parameters(), lr=1.0), batches, rt, grad_clip=1.0)
    assert metrics["skipped_step"] == 1.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
