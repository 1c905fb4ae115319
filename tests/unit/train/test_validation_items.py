"""train.val_batches counts global batches: validation sees the same items under any
micro-batch size and data-parallel size (it counted micro-batches per rank, so the RM's
validation accuracy moved with the layout: 0.5625 at micro 16, 0.5000 at micro 4)."""

from offline_rlhf.config.schema import ParallelConfig, TrainConfig
from offline_rlhf.data.batching import collate_sequences
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.stages.sft import sft_task
from offline_rlhf.train.loop import Task, TrainData, validate, validation_items
from tests.fixtures import TINY, reference_model, runtime_for, sft_sequences


def test_val_batches_are_global_batches_whatever_the_micro_batch():
    val = list(range(100))
    for micro_batch in (1, 2, 8):
        cfg = TrainConfig(global_batch=8, micro_batch=micro_batch, val_batches=3)
        assert validation_items(val, cfg) == val[:24]
    assert validation_items(val, TrainConfig(global_batch=8, val_batches=0)) == val  # 0: the whole split
    assert validation_items(val[:5], TrainConfig(global_batch=8, val_batches=3)) == val[:5]


def test_validation_builds_no_autograd_graph():
    """Was: `validate` ran with gradients enabled (its no_grad had moved onto
    `validation_items`), keeping every layer's activations alive for a backward that never
    came: a model that trains in memory could run out of it at validation."""
    sft = sft_task(packed=True)
    seen = []

    def loss(model, batch, normalizer):
        value, metrics = sft.loss(model, batch, normalizer)
        seen.append(value.requires_grad)
        return value, metrics

    task = Task(loss=loss, normalizer=sft.normalizer, tokens=sft.tokens)
    data = TrainData(train=[], val=sft_sequences(4), collate=lambda items: collate_sequences(items, pad_id=0),
                     seq_len=32)
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None)
    metrics = validate(task, reference_model(), data, TrainConfig(global_batch=4, micro_batch=2), rt)
    assert seen == [False, False] and metrics["loss"] > 0
