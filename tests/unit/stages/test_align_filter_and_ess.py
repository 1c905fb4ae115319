"""MLE with filtering trains only on kept samples (filtered ones never reach a batch), and
RWR's effective sample size is that of the global batch, not a sum over micro-batches."""

import json
import math

import pytest
import torch
from pytest import approx

from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.config.training import AlignConfig, AlignDataConfig
from offline_rlhf.data.alignment_dataset import RewardedSequence, build_alignment_dataset
from offline_rlhf.data.errors import DataError
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.stages.align import alignment_task, collate_rewarded, dataset_summary
from offline_rlhf.train.loop import train_step
from tests.fixtures import TINY, reference_model, runtime_for, sft_sequences

REWARDS = [1.0, -1.0, 0.5, 2.0]


def rwr_step(micro_batch: int) -> dict[str, float]:
    items = [RewardedSequence(s, r) for s, r in zip(sft_sequences(4), REWARDS)]
    batches = [collate_rewarded(items[i:i + micro_batch], pad_id=0) for i in range(0, 4, micro_batch)]
    model = reference_model()
    task = alignment_task(AlignConfig(method="rwr", rwr_beta=5.0, data=AlignDataConfig(path="x")))
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None)
    return train_step(task, model, torch.optim.SGD(model.parameters(), lr=0.1), batches, rt, grad_clip=1.0)[0]


def test_rwr_ess_is_over_the_global_batch_whatever_the_micro_batch():
    """At micro-batch 1 every micro-batch has ESS 1, so the summed per-call ESS read 4 of 4."""
    weights = [math.exp(r / 5.0) for r in REWARDS]
    ess = sum(weights) ** 2 / sum(w * w for w in weights)
    for micro_batch in (1, 2, 4):
        metrics = rwr_step(micro_batch)
        assert metrics["count/ess"] == approx(ess, rel=1e-5)
        assert metrics["ess_fraction"] == approx(ess / 4, rel=1e-5) and metrics["ess_fraction"] < 0.99


@pytest.fixture
def labeled(tmp_path):
    path = tmp_path / "labeled.jsonl"
    rewards = [0.5, -0.5, 1.5, -2.0, 0.1, -0.1, 2.5, -1.0, 0.0, 0.7]
    path.write_text("".join(json.dumps({"prompt": f"question {i}", "response": f"answer number {i}",
                                        "reward": r}) + "\n" for i, r in enumerate(rewards)))
    return path


def build(path, rm_tokenizer_dir, keep_above):
    return build_alignment_dataset(path, Tokenizer.from_dir(rm_tokenizer_dir), ChatTemplate(), 64, 0.2, 3,
                                   reward_prompt=False, keep_above=keep_above)


def test_filtered_samples_never_enter_the_splits(labeled, rm_tokenizer_dir):
    everything = build(labeled, rm_tokenizer_dir, None)
    kept = build(labeled, rm_tokenizer_dir, 0.0)
    assert len(everything.train) == 8 and len(everything.val) == 2
    assert all(item.reward > 0 for item in kept.train + kept.val)
    assert {i.reward for i in kept.train} == {i.reward for i in everything.train if i.reward > 0}
    assert kept.card["filter"] == {"threshold": 0.0, "train_filtered": 8 - len(kept.train),
                                   "val_filtered": 2 - len(kept.val)}
    assert len(kept.train) + len(kept.val) == 5  # 0.5, 1.5, 0.1, 2.5, 0.7; 0.0 is not > 0
    assert kept.card["train_rewards"] == everything.card["train_rewards"]  # the data, before the filter
    cfg = AlignConfig(method="mle_filter", data=AlignDataConfig(path=str(labeled)))
    assert (f"{len(kept.train)} ({len(kept.train) / 8:.1%}) pass the filter R > 0.0 and are trained on, "
            f"{8 - len(kept.train)} filtered out") in dataset_summary(cfg, kept)


def test_a_filter_that_keeps_nothing_is_one_line(labeled, rm_tokenizer_dir):
    with pytest.raises(DataError) as err:
        build(labeled, rm_tokenizer_dir, 3.0)
    assert str(err.value).startswith(f"{labeled}: expected a training sample with 'reward' > 3.0 "
                                     "(filter_threshold; the highest of 8 is ")


def test_a_dt_target_no_training_reward_reaches_is_noted():
    from offline_rlhf.stages.align import warn_unseen_target

    rewards = {"min": -1.6, "max": 2.0}
    lines = []
    for target in (5.0, 1.5, -1.6, -3.0):
        warn_unseen_target(AlignConfig(method="dt", dt_target=target, data=AlignDataConfig(path="x")), rewards,
                           lines.append)
    assert [line.split(" (")[0] for line in lines] == ["note: dt_target=5", "note: dt_target=-3"]
    assert "outside the training rewards [-1.60, 2.00]" in lines[0]


def rwr_normalized_loss(rewards: list[float]) -> float:
    items = [RewardedSequence(s, r) for s, r in zip(sft_sequences(2), rewards)]
    task = alignment_task(AlignConfig(method="rwr", rwr_beta=0.5, rwr_normalize=True, data=AlignDataConfig(path="x")))
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None)
    model = reference_model()
    return train_step(task, model, torch.optim.SGD(model.parameters(), lr=0.1), [collate_rewarded(items, pad_id=0)],
                      rt, grad_clip=1.0)[0]["loss"]


def test_rwr_normalize_gives_a_weighted_mean_however_small_the_weights():
    """A weighted mean does not change when every reward moves by the same amount. The loop
    floored its divisor at 1, so at weights of exp(-20) the loss came out 1e-8 too small."""
    assert rwr_normalized_loss([-10.0, -12.0]) == approx(rwr_normalized_loss([0.0, -2.0]), rel=1e-4)


def test_a_reward_just_above_the_threshold_is_trained_on_as_the_dataset_kept_it():
    """The dataset's filter compares in float64; the loss's filter saw float32 rewards, in
    which 0.1 + 1e-10 is 0.1, and gave the kept sample no loss."""
    batch = collate_rewarded([RewardedSequence(sft_sequences(1)[0], 0.1 + 1e-10)], pad_id=0)
    task = alignment_task(AlignConfig(method="mle_filter", filter_threshold=0.1, data=AlignDataConfig(path="x")))
    assert task.normalizer(batch) > 0
