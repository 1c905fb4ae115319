"""Reward scoring and the reward-model training step under TP=2 and DP=2 equal one process."""

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.data.packing import unpacked
from offline_rlhf.data.preference_dataset import PreferencePair
from offline_rlhf.data.preference_readers import PreferenceExample
from offline_rlhf.data.tokenize import IGNORE_INDEX, TokenizedSample
from offline_rlhf.labeling.scoring import score_sequences
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.stages.rm import collate_pairs, init_value_head, rm_task
from offline_rlhf.train.loop import train_step
from tests.distributed.launch import run_distributed
from tests.fixtures import TINY, parallel_copy, reference_model, runtime_for

LAYOUTS = [dict(tp=2), dict(tp=2, sequence_parallel=True), dict(dp=2)]
IDS = ["tp2", "tp2_sp", "dp2_fsdp"]


def sequences(count: int, seed: int = 0):
    """One-document sequences of 3..20 random tokens (uneven lengths exercise padding)."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        ids = torch.randint(3, TINY.vocab_size, (int(torch.randint(3, 21, (1,), generator=gen)),), generator=gen)
        samples.append(TokenizedSample(tuple(ids.tolist()), (IGNORE_INDEX,) * len(ids), f"s{index}", False))
    return unpacked(samples)


def pairs(count: int):
    chosen, rejected = sequences(count, seed=1), sequences(count, seed=2)
    return [PreferencePair(c, r, PreferenceExample("p", f"c{i}", f"r{i}", f"s:{i}"))
            for i, (c, r) in enumerate(zip(chosen, rejected))]


def _parallel_scores(rank, world_size, parallel):
    model, dims, mesh = parallel_copy(reference_model(TINY, "value"), world_size, **parallel)
    # 11 sequences in batches of 3: DP shares of 6 and 5, the last batch of one rank short.
    return score_sequences(model, sequences(11), 3, runtime_for(dims, mesh), pad_id=0)


@pytest.mark.parametrize("parallel", LAYOUTS, ids=IDS)
def test_scores_match_single_process_in_input_order(tmp_path, parallel):
    single = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None)
    expected = score_sequences(reference_model(TINY, "value"), sequences(11), 11, single, pad_id=0)
    for scores in run_distributed(_parallel_scores, 2, tmp_path, parallel):
        assert scores == pytest.approx(expected, abs=1e-5)


def rm_step(model, batches, rt):
    metrics, _ = train_step(rm_task(margin=0.5), model, torch.optim.SGD(model.parameters(), lr=1.0), batches, rt,
                            grad_clip=100.0)
    weights = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
               for n, p in model.named_parameters()}
    return metrics, weights


def _parallel_step(rank, world_size, parallel):
    model, dims, mesh = parallel_copy(reference_model(TINY, "value"), world_size, **parallel)
    dp_rank = mesh.get_local_rank("dp")
    mine = pairs(4)[dp_rank * 4 // dims.dp:(dp_rank + 1) * 4 // dims.dp]
    multiple = dims.tp if dims.sequence_parallel else 1
    batches = [collate_pairs([pair], pad_id=0, multiple_of=multiple) for pair in mine]
    return rm_step(model, batches, runtime_for(dims, mesh))


@pytest.mark.parametrize("parallel", LAYOUTS, ids=IDS)
def test_rm_train_step_matches_single_process(tmp_path, parallel):
    single = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None)
    ref_metrics, ref_weights = rm_step(reference_model(TINY, "value"), [collate_pairs(pairs(4), pad_id=0)], single)
    for metrics, weights in run_distributed(_parallel_step, 2, tmp_path, parallel):
        for key in ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin"):
            assert abs(metrics[key] - ref_metrics[key]) < 1e-5, key
        assert abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) < 1e-4
        for name, weight in ref_weights.items():
            torch.testing.assert_close(weights[name], weight, atol=2e-6, rtol=1e-5, msg=name)


def _value_head(rank, world_size, parallel):
    model, _, _ = parallel_copy(reference_model(TINY, "value"), world_size, **parallel)
    init_value_head(model, seed=7)
    # Full tensors on every rank (a collective); with cpu_offload only rank 0 would get them.
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))["score.weight"]


@pytest.mark.parametrize("parallel", LAYOUTS[::2], ids=IDS[::2])
def test_new_value_head_is_the_same_under_every_layout(tmp_path, parallel):
    single = reference_model(TINY, "value")
    init_value_head(single, seed=7)
    for weight in run_distributed(_value_head, 2, tmp_path, parallel):
        assert torch.equal(weight, single.score.weight.detach())
