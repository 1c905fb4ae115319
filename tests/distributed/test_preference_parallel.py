"""DPO/IPO/cDPO training steps under DP=2 (FSDP2) and TP=2 (with sequence and loss
parallelism) equal one process on the same global batch of pairs, and the summed response
log-probs of the reference pass under TP=2 equal TP=1's."""

import pytest
import torch
from torch.distributed.tensor import DTensor

from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.labeling.pairs import sequence_logps
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.parallel.parallelize import build_inference_model, build_mesh
from offline_rlhf.parallel.state_dict import load_full_state_dict
from offline_rlhf.stages.align import collate_referenced, preference_task
from offline_rlhf.train.loop import train_step
from tests.distributed.launch import run_distributed
from tests.fixtures import TINY, parallel_copy, reference_model, runtime_for
from tests.unit.stages.test_dpo_step import METRICS, align_config, dpo_sgd_step, referenced_pairs, replies

LAYOUTS = [dict(dp=2), dict(tp=2), dict(tp=2, sequence_parallel=True, loss_parallel=True)]
IDS = ["dp2_fsdp", "tp2", "tp2_sp_loss_parallel"]
METHODS = [("dpo", {}), ("ipo", {}), ("cdpo", {"label_smoothing": 0.2})]


def _parallel_step(rank, world_size, parallel, method, extra):
    model, dims, mesh = parallel_copy(reference_model(TINY), world_size, **parallel)
    dp_rank = mesh.get_local_rank("dp")
    mine = referenced_pairs(4)[dp_rank * 4 // dims.dp:(dp_rank + 1) * 4 // dims.dp]
    # Two pairs per rank under DP=2 as micro-batches of one (accumulation too); four otherwise.
    batches = [collate_referenced([pair], pad_id=0, multiple_of=dims.sequence_multiple) for pair in mine]
    metrics, _ = train_step(preference_task(align_config(method, **extra)), model,
                            torch.optim.SGD(model.parameters(), lr=1.0), batches, runtime_for(dims, mesh),
                            grad_clip=100.0)
    weights = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
               for n, p in model.named_parameters()}
    return metrics, weights


@pytest.mark.parametrize("method,extra", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("parallel", LAYOUTS, ids=IDS)
def test_preference_step_matches_single_process(tmp_path, parallel, method, extra):
    ref_metrics, ref_weights = dpo_sgd_step(referenced_pairs(4), 4, method, **extra)
    for metrics, weights in run_distributed(_parallel_step, 2, tmp_path, parallel, method, extra):
        for key in METRICS:
            assert metrics[key] == pytest.approx(ref_metrics[key], abs=1e-5), key
        assert abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) < 1e-4
        for name, weight in ref_weights.items():
            torch.testing.assert_close(weights[name], weight, atol=2e-6, rtol=1e-5, msg=name)


def _tp_logps(rank, world_size):
    """The reference pass's layout: a TP-only replica (build_inference_model)."""
    dims = ParallelDims.build(ParallelConfig(tp=2), world_size, TINY)
    mesh = build_mesh(dims, torch.device("cpu"))
    model = build_inference_model(TINY, "lm", dims, mesh, torch.device("cpu"))
    load_full_state_dict(model, reference_model(TINY).state_dict())
    return sequence_logps(model.eval(), replies(7, seed=4), 3, runtime_for(dims, mesh), pad_id=0)


def test_reference_logps_tp2_equal_tp1(tmp_path):
    single = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None)
    expected = sequence_logps(reference_model(TINY), replies(7, seed=4), 7, single, pad_id=0)
    for values in run_distributed(_tp_logps, 2, tmp_path):
        assert values == pytest.approx(expected, abs=1e-4)
