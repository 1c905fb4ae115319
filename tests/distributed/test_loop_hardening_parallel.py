"""Under DP=2 (FSDP2): a validation set smaller than the dp size, and the final-weights
check when only one rank's shard holds a NaN."""

import torch
from torch.distributed.tensor import DTensor

from offline_rlhf.checkpoint import TrainState
from offline_rlhf.config.schema import TrainConfig
from offline_rlhf.data.batching import collate_sequences
from offline_rlhf.stages.sft import sft_task
from offline_rlhf.train.loop import TrainData, TrainingFailed, check_learned, validate
from tests.distributed.launch import run_distributed
from tests.fixtures import parallel_copy, reference_model, runtime_for, sft_sequences


def _validate_one_item(rank, world_size):
    model, dims, mesh = parallel_copy(reference_model(), world_size, dp=2)
    data = TrainData([], sft_sequences(1), lambda items: collate_sequences(items, pad_id=0), seq_len=24)
    return validate(sft_task(packed=True), model, data, TrainConfig(micro_batch=1), runtime_for(dims, mesh))


def test_validation_set_smaller_than_dp_size(tmp_path):
    """Rank 1 has no item: it reduced an empty metric list against rank 0's full one and
    gloo aborted the process (the `align` stage died at its first validation)."""
    results = run_distributed(_validate_one_item, 2, tmp_path, timeout=120.0)
    assert results[0] == results[1] and results[0]["loss"] > 0


def _nan_on_rank_1(rank, world_size):
    model, dims, mesh = parallel_copy(reference_model(), world_size, dp=2)
    weight = next(model.parameters())
    assert isinstance(weight, DTensor)
    if rank == 1:
        with torch.no_grad():
            weight.to_local()[0, 0] = float("nan")
    try:
        check_learned(model, TrainState(step=4, data_position={"skipped_steps": 0}), 4, TrainConfig(),
                      runtime_for(dims, mesh))
    except TrainingFailed as err:
        return str(err)
    return None


def test_a_nan_in_one_shard_fails_every_rank(tmp_path):
    for message in run_distributed(_nan_on_rank_1, 2, tmp_path):
        assert message is not None and message.startswith("optim: the final weights hold NaN or Inf")
