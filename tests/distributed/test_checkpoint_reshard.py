"""A checkpoint saved under one layout loads under another with identical logits."""

import pytest
import torch
from torch.distributed.tensor import DTensor

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from offline_rlhf.models.llama import Transformer
from tests.distributed.launch import run_distributed
from tests.fixtures import TINY, batch, parallel_copy, reference_model


def _train_one_step_and_save(rank, world_size, root, parallel):
    model, _, _ = parallel_copy(reference_model(), world_size, **parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(batch()).float().pow(2).mean().backward()
    optimizer.step()
    meta = CheckpointMeta(model=TINY, head="lm", train_state=TrainState(step=1, tokens_seen=64))
    save_checkpoint(root, model, meta, optimizer=optimizer)
    logits = model(batch())
    return (logits.full_tensor() if isinstance(logits, DTensor) else logits).detach()


def _load_single_process(root):
    model = Transformer(TINY)
    model.init_weights()  # overwritten by the load
    meta = load_checkpoint(latest_checkpoint(root), model)
    return model(batch()).detach(), meta


@pytest.mark.parametrize("parallel,world_size", [
    (dict(tp=2), 2),
    (dict(tp=1, dp=2), 2),
    (dict(tp=2, dp=2, sequence_parallel=True), 4),
], ids=["tp2_to_tp1", "fsdp_dp2_to_dp1", "tp2xdp2_to_single"])
def test_checkpoint_reshards_to_one_process(tmp_path, parallel, world_size):
    root = tmp_path / "ckpt"
    saved_logits = run_distributed(_train_one_step_and_save, world_size, tmp_path, str(root), parallel)[0]
    loaded_logits, meta = _load_single_process(root)
    assert meta.train_state.step == 1 and meta.world_size == world_size and meta.has_optimizer
    torch.testing.assert_close(loaded_logits, saved_logits, atol=1e-5, rtol=1e-5)
    # The step changed the weights, so equality is not an accident of the initialization.
    assert not torch.allclose(loaded_logits, reference_model()(batch()), atol=1e-4)


def _load_into_tp2(rank, world_size, root):
    model, _, _ = parallel_copy(Transformer(TINY), world_size, tp=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_checkpoint(latest_checkpoint(root), model, optimizer)
    logits = model(batch())
    return logits.full_tensor() if isinstance(logits, DTensor) else logits.detach()


def test_single_process_checkpoint_loads_at_tp2_with_optimizer(tmp_path):
    model = reference_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(batch()).pow(2).mean().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ckpt", model, CheckpointMeta(model=TINY, head="lm", train_state=TrainState(step=3)),
                    optimizer=optimizer)
    expected = model(batch()).detach()
    for logits in run_distributed(_load_into_tp2, 2, tmp_path, str(tmp_path / "ckpt")):
        torch.testing.assert_close(logits.detach(), expected, atol=1e-5, rtol=1e-5)
