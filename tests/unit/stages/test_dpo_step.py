"""The DPO-family task in the generic training step: a pair is one unit, so micro-batching
x accumulation leave the step unchanged and the loss is the mean over pairs; the policy's
log-probs at the start equal the reference's (loss log 2); AlignConfig's checks."""

import math

import pytest
import torch

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.config.training import AlignConfig, AlignDataConfig
from offline_rlhf.data.packing import unpacked
from offline_rlhf.data.pair_dataset import ReferencedPair
from offline_rlhf.data.tokenize import IGNORE_INDEX, TokenizedSample
from offline_rlhf.labeling.pairs import sequence_logps
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.stages.align import collate_referenced, preference_task
from offline_rlhf.train.loop import train_step
from tests.fixtures import TINY, reference_model, runtime_for

METRICS = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin", "count/pairs")


def align_config(method="dpo", **extra):
    return AlignConfig(method=method, model=TINY, data=AlignDataConfig(pairs="pairs.jsonl", max_seq_len=64), **extra)


def replies(count: int, seed: int):
    """One-document sequences: a 3-token prompt (no loss) and a 2..14-token reply."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        ids = torch.randint(3, TINY.vocab_size, (3 + int(torch.randint(2, 15, (1,), generator=gen)),), generator=gen)
        samples.append(TokenizedSample(tuple(ids.tolist()), (IGNORE_INDEX,) * 3 + tuple(ids[3:].tolist()), f"s{index}",
                                       False))
    return unpacked(samples)


def referenced_pairs(count: int = 4, reference_seed: int = 1, with_ref=None):
    """Pairs of random replies with the log-probs of a DIFFERENT model (seed 1) as their
    reference, so the log-ratio margins are not zero."""
    chosen, rejected = replies(count, seed=2), replies(count, seed=3)
    single = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None)
    ref = with_ref or reference_model(TINY, seed=reference_seed)
    ref_chosen, ref_rejected = (sequence_logps(ref, side, 3, single, pad_id=0) for side in (chosen, rejected))
    return [ReferencedPair(*values) for values in zip(chosen, rejected, ref_chosen, ref_rejected)]


def dpo_sgd_step(pairs, micro_batch, method="dpo", **extra):
    model = reference_model(TINY)
    batches = [collate_referenced(pairs[i:i + micro_batch], pad_id=0) for i in range(0, len(pairs), micro_batch)]
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None)
    metrics, _ = train_step(preference_task(align_config(method, **extra)), model,
                            torch.optim.SGD(model.parameters(), lr=1.0), batches, rt, grad_clip=100.0)
    return metrics, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_collate_puts_chosen_rows_first_and_carries_reference_sums():
    pairs = referenced_pairs(3)
    batch = collate_referenced(pairs, pad_id=0)
    for row, sequence in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
        assert batch["tokens"][row, :len(sequence)].tolist() == list(sequence.input_ids)
    assert batch["ref_chosen"].dtype == torch.float64
    assert batch["ref_rejected"].tolist() == [p.ref_rejected for p in pairs]


@pytest.mark.parametrize("method,extra", [("dpo", {}), ("ipo", {}), ("cdpo", {"label_smoothing": 0.2}),
                                          ("dpo", {"beta": 5.0})])
def test_micro_batch_1_x_4_equals_4_x_1(method, extra):
    pairs = referenced_pairs(4)
    accumulated, weights_acc = dpo_sgd_step(pairs, 1, method, **extra)
    whole, weights_whole = dpo_sgd_step(pairs, 4, method, **extra)
    for key in METRICS:
        assert accumulated[key] == pytest.approx(whole[key], abs=1e-5), key
    assert whole["count/pairs"] == 4.0
    assert abs(accumulated["grad_norm"] - whole["grad_norm"]) < 1e-5
    for name, weight in weights_whole.items():
        torch.testing.assert_close(weights_acc[name], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_loss_is_the_mean_over_pairs_whatever_their_lengths():
    pairs = referenced_pairs(4)
    metrics, _ = dpo_sgd_step(pairs, 2)
    per_pair = [dpo_sgd_step([p], 1)[0]["loss"] for p in pairs]
    assert metrics["loss"] == pytest.approx(sum(per_pair) / 4, abs=1e-6)
    assert len({round(v, 4) for v in per_pair}) == 4  # the pairs really differ


def test_policy_equal_to_its_reference_gives_log_2():
    """Reference log-probs of the training model itself: h = 0 for every pair."""
    metrics, _ = dpo_sgd_step(referenced_pairs(4, with_ref=reference_model(TINY)), 2)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-6) and metrics["grad_norm"] > 0


@pytest.mark.parametrize("key,value,message", [("beta", 0.0, "beta: must be > 0"),
                                               ("label_smoothing", 0.5, r"label_smoothing: must be in \[0, 0.5\)")])
def test_config_refuses_bad_values(key, value, message):
    with pytest.raises(ConfigError, match=message):
        align_config(**{key: value})


def test_preference_methods_need_the_pairs_file_not_the_labeled_one():
    with pytest.raises(ConfigError, match="data.pairs: is required.*orlhf reference"):
        AlignConfig(method="ipo", model=TINY, data=AlignDataConfig(path="mix.jsonl", max_seq_len=64))
    assert AlignConfig(method="cdpo", model=TINY, data=AlignDataConfig(pairs="p.jsonl", max_seq_len=64)).beta == 0.1
