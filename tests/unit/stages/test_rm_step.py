"""The reward-model task in the generic training step, the scoring function in one process,
loading an SFT checkpoint into a value-head model, and RMConfig's checks."""

import pytest
import torch

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import DataConfig, InitConfig, ParallelConfig, SourceConfig
from offline_rlhf.config.training import RMConfig
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.labeling.scoring import encode_responses, score_sequences, score_texts
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.stages.rm import collate_pairs, rm_task
from offline_rlhf.train.init import initialize_weights
from offline_rlhf.train.loop import train_step
from tests.fixtures import reference_model, runtime_for
from tests.synthetic_preferences import MODEL, preference_records


def rm_pairs(tokenizer, count=4):
    from offline_rlhf.data.preference_dataset import encode_pair
    from offline_rlhf.data.preference_readers import PreferenceExample
    from offline_rlhf.data.tokenize import TokenStats

    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"], f"s:{i}")
                for i, r in enumerate(preference_records(count, seed=5))]
    return [encode_pair(tokenizer, ChatTemplate(), e, 64, TokenStats()) for e in examples]


def single_runtime():
    return runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None)


@pytest.fixture(scope="module")
def tokenizer(rm_tokenizer_dir):
    return Tokenizer.from_dir(rm_tokenizer_dir)


def rm_sgd_step(pairs, micro_batch, pad_id):
    model = reference_model(MODEL, "value")
    batches = [collate_pairs(pairs[i:i + micro_batch], pad_id) for i in range(0, len(pairs), micro_batch)]
    metrics, _ = train_step(rm_task(), model, torch.optim.SGD(model.parameters(), lr=1.0), batches,
                            single_runtime(), grad_clip=100.0)
    return metrics, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_collate_puts_all_chosen_rows_before_all_rejected_rows(tokenizer):
    pairs = rm_pairs(tokenizer, 3)
    batch = collate_pairs(pairs, tokenizer.pad_id)
    for row, sequence in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
        assert batch["tokens"][row, :len(sequence)].tolist() == list(sequence.input_ids)


def test_accumulated_micro_batches_equal_one_batch(tokenizer):
    pairs = rm_pairs(tokenizer, 4)
    accumulated, weights_acc = rm_sgd_step(pairs, 1, tokenizer.pad_id)
    whole, weights_whole = rm_sgd_step(pairs, 4, tokenizer.pad_id)
    for key in ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin"):
        assert abs(accumulated[key] - whole[key]) < 1e-5, key
    assert 0 <= whole["accuracy"] <= 1
    assert abs(whole["margin"] - (whole["chosen_reward"] - whole["rejected_reward"])) < 1e-5
    for name, weight in weights_whole.items():
        torch.testing.assert_close(weights_acc[name], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_scores_are_in_input_order_whatever_the_batch_size(tokenizer):
    model = reference_model(MODEL, "value")
    pairs = [(r["prompt"], r["chosen"]) for r in preference_records(7, seed=2)]
    sequences = encode_responses(tokenizer, ChatTemplate(), pairs, 64)
    with torch.no_grad():  # one unpadded sequence at a time: the value at its last token
        expected = [model(torch.tensor([s.input_ids]))[0, -1].item() for s in sequences]
    for batch_size in (1, 3, 16):
        scores = score_sequences(model, sequences, batch_size, single_runtime(), tokenizer.pad_id)
        assert scores == pytest.approx(expected, abs=1e-5)
    assert score_texts(model, tokenizer, ChatTemplate(), pairs, 4, single_runtime(), max_len=64) == \
        pytest.approx(expected, abs=1e-5)


def test_a_non_finite_reward_is_an_error_not_a_label(tokenizer):
    model = reference_model(MODEL, "value")
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    sequences = encode_responses(tokenizer, ChatTemplate(), [("a", "b"), ("c", "d")], 64)
    with pytest.raises(ConfigError, match="non-finite reward for 2 of 2 sequences"):
        score_sequences(model, sequences, 2, single_runtime(), tokenizer.pad_id)


def test_sft_checkpoint_loads_into_a_value_head_model_partially(tmp_path):
    sft = reference_model(MODEL, "lm", seed=1)
    save_checkpoint(tmp_path / "sft", sft, CheckpointMeta(model=MODEL, head="lm", train_state=TrainState()))
    rm = reference_model(MODEL, "value", seed=2)
    head_before = rm.score.weight.detach().clone()
    initialize_weights(InitConfig(checkpoint=str(tmp_path / "sft")), rm, tmp_path / "rm", may_lack=("score.weight",))
    for name, tensor in sft.state_dict().items():
        if name != "output.weight":
            assert torch.equal(rm.state_dict()[name], tensor), name
    assert torch.equal(rm.score.weight, head_before)


def rm_config(**fields):
    data = fields.pop("data", DataConfig(sources=[SourceConfig(path="x.jsonl")], pack=False, val_fraction=0.1))
    return RMConfig(data=data, **fields)


def test_rm_defaults_are_the_papers():
    cfg = rm_config()
    assert (cfg.optim.lr, cfg.train.global_batch, cfg.train.epochs, cfg.margin) == (9e-6, 128, 1.0, 0.0)


@pytest.mark.parametrize("fields, key", [
    (dict(data=DataConfig(sources=[SourceConfig(path="x")], pack=True)), "data.pack"),
    (dict(data=DataConfig(sources=[SourceConfig(path="x")], pack=False, val_fraction=0.0)), "data.val_fraction"),
    (dict(eval_only=True), "init.checkpoint"),
])
def test_rm_config_errors_name_the_key(fields, key):
    with pytest.raises(ConfigError) as error:
        rm_config(**fields)
    assert str(error.value).startswith(key)
