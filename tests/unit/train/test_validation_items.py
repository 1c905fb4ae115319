"""train.val_batches counts global batches: validation sees the same items under any
micro-batch size and data-parallel size (it counted micro-batches per rank, so the RM's
validation accuracy moved with the layout: 0.5625 at micro 16, 0.5000 at micro 4)."""

from offline_rlhf.config.schema import TrainConfig
from offline_rlhf.train.loop import validation_items


def test_val_batches_are_global_batches_whatever_the_micro_batch():
    val = list(range(100))
    for micro_batch in (1, 2, 8):
        cfg = TrainConfig(global_batch=8, micro_batch=micro_batch, val_batches=3)
        assert validation_items(val, cfg) == val[:24]
    assert validation_items(val, TrainConfig(global_batch=8, val_batches=0)) == val  # 0: the whole split
    assert validation_items(val[:5], TrainConfig(global_batch=8, val_batches=3)) == val[:5]
