"""`orlhf rm`: reward-model training (paper step 2, Eq. 2) into `run_dir/rm/`; with
`eval_only=true`, the accuracy of a reward model on preference data into `run_dir/rm_eval/`."""

from __future__ import annotations

import json
from functools import partial

import torch

from offline_rlhf.checkpoint import REWARD_STATS
from offline_rlhf.config.training import RMConfig
from offline_rlhf.data.batching import collate_sequences, real_tokens
from offline_rlhf.data.preference_dataset import PreferencePair, build_preference_dataset
from offline_rlhf.data.sft_dataset import read_summary, write_dataset_card
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.labeling.scoring import (
    load_reward_model,
    reward_stats,
    score_sequences,
    scoring_metadata,
    sequence_rewards,
)
from offline_rlhf.losses.reward import bradley_terry_loss
from offline_rlhf.parallel.state_dict import load_full_state_dict
from offline_rlhf.runtime import Runtime, stage_runtime
from offline_rlhf.stage_checks import load_tokenizer
from offline_rlhf.stage_support import (
    check_checkpoint_resumable,
    init_template,
    local_init,
    mark_done,
    model_config,
    training_fingerprint,
)
from offline_rlhf.train.init import prepare_training
from offline_rlhf.train.loop import CheckpointSpec, Task, TrainData, TrainingFailed, train, validate, validation_items

STAGE = "rm"
EVAL_STAGE = "rm_eval"
EVAL_FILE = "eval.json"


def collate_pairs(pairs: list[PreferencePair], pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Rows [c0..cn-1, r0..rn-1]: both replies of a pair in one micro-batch, so one
    forward gives both rewards of Eq. 2."""
    return collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, multiple_of)


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    return batch["tokens"].shape[0] // 2


def rm_task(margin: float = 0.0) -> Task:
    def loss(model, batch, normalizer):
        chosen, rejected = sequence_rewards(model, batch).float().chunk(2)
        return bradley_terry_loss(chosen, rejected, normalizer, margin)

    return Task(loss=loss, normalizer=pair_count, tokens=real_tokens)


def init_value_head(model, seed: int) -> None:
    """Normal(0, init_std) for `score.weight` from a CPU generator seeded with `seed`, so the
    new head (which an SFT checkpoint lacks) is the same under every TP/DP layout; the
    seeded init of a parallelized model draws its random numbers layout by layout."""
    weight = torch.randn((1, model.cfg.dim), generator=torch.Generator().manual_seed(seed)) * model.cfg.init_std
    load_full_state_dict(model, {"score.weight": weight}, strict=False)


def validation_reward_stats(pairs: list[PreferencePair], pad_id: int, batch_size: int, rt: Runtime):
    """The `final_metadata` callback: mean and std of the rewards of every validation
    response, chosen and rejected, for the z-score normalization of labeling."""
    responses = [sequence for pair in pairs for sequence in (pair.chosen, pair.rejected)]

    def metadata(model) -> dict:
        scores = score_sequences(model, responses, batch_size, rt, pad_id)
        return {REWARD_STATS: reward_stats(scores, "validation responses")}

    return metadata


def main(cfg: RMConfig) -> int:
    return evaluate(cfg) if cfg.eval_only else train_reward_model(cfg)


def train_reward_model(cfg: RMConfig) -> int:
    init = local_init(cfg.init, cfg.run_dir)  # a Hugging Face model is imported once, into the run
    model_cfg = model_config(init, cfg.model)
    # The SFT checkpoint's template (scoring renders as the model was trained): a config
    # asking for another fails here, before any weights load.
    template = init_template(init, cfg.data.template, "data.template", load_tokenizer(init, model_cfg)[0].config)
    with stage_runtime(STAGE, cfg.run_dir, cfg.parallel, model_cfg, cfg) as (rt, usage):
        # The SFT checkpoint has no `score.weight`: it keeps `init_value_head`'s values (the
        # value-head load is partial), and the LM head's `output.weight` is not requested.
        setup = prepare_training(init, model_cfg, "value", rt, cfg.train.seed,
                                 before_load=lambda model: init_value_head(model, cfg.train.seed))
        dataset = build_preference_dataset(cfg.data, setup.tokenizer, cfg.train.seed, template,
                                           progress=cfg.logging.progress)
        fingerprint = training_fingerprint(cfg, dataset.train, init)
        check_checkpoint_resumable(setup.checkpoints, fingerprint)  # a refused rerun keeps the card
        if rt.is_main:
            write_dataset_card(dataset.card, rt.stage_dir)
        if not dataset.val:  # before training: the reward statistics stored at its end are taken over them
            raise TrainingFailed("data", "no validation pairs: the only pair, or every pair put in validation, was "
                                 "skipped as unusable (dataset_card.md in the stage folder has the counts)",
                                 "add pairs, raise data.val_fraction, or raise data.max_seq_len if pairs were "
                                 "identical after truncation")
        collate = partial(collate_pairs, pad_id=setup.tokenizer.pad_id, multiple_of=rt.dims.sequence_multiple)
        stats = validation_reward_stats(dataset.val, setup.tokenizer.pad_id, cfg.train.micro_batch * 2, rt)

        def final_metadata(trained) -> dict:
            return {**stats(trained), **scoring_metadata(template, cfg.data.max_seq_len)}

        result = train(rm_task(cfg.margin), setup.model,
                       TrainData(dataset.train, dataset.val, collate, cfg.data.max_seq_len),
                       cfg.train, cfg.optim, cfg.logging, rt, usage,
                       CheckpointSpec(setup.checkpoints, model_cfg, "value", setup.tokenizer_path, final_metadata,
                                      fingerprint))
        accuracy = result.last_val.get("accuracy")
        scored = len(validation_items(dataset.val, cfg.train))
        validation = (f"validation accuracy {accuracy:.4f} on {scored} pairs" if accuracy is not None
                      else "no validation pairs" if not len(dataset.val)
                      else "already complete (its validation is in metrics.jsonl)")
        rt.log(f"rm done: {result.steps} steps, {validation}, final checkpoint {result.checkpoint}; "
               f"pairs {read_summary(dataset.card)}")
        mark_done(rt, result.checkpoint)
    return 0


def evaluate(cfg: RMConfig) -> int:
    """Every pair of `cfg.data` (its train and validation splits together), no training."""
    init = local_init(cfg.init, cfg.run_dir)
    model_cfg = model_config(init, cfg.model)
    with stage_runtime(EVAL_STAGE, cfg.run_dir, cfg.parallel, model_cfg, cfg) as (rt, usage):
        model, tokenizer, _ = load_reward_model(init.checkpoint, rt, key="init.checkpoint")
        template = init_template(init, cfg.data.template, "data.template", tokenizer.config)  # as it was trained
        dataset = build_preference_dataset(cfg.data, tokenizer, cfg.train.seed, template, progress=cfg.logging.progress)
        pairs = dataset.train + dataset.val
        collate = partial(collate_pairs, pad_id=tokenizer.pad_id, multiple_of=rt.dims.sequence_multiple)
        data = TrainData([], pairs, collate, cfg.data.max_seq_len)
        metrics = validate(rm_task(cfg.margin), model, data, cfg.train, rt)
        usage.tokens += sum(len(p.chosen) + len(p.rejected) for p in pairs)
        if rt.is_main:
            write_dataset_card(dataset.card, rt.stage_dir)
            write_atomic(rt.stage_dir / EVAL_FILE, json.dumps({"pairs": len(pairs), **metrics}, indent=2) + "\n")
        rt.log(f"rm eval: {len(pairs)} pairs, " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
               + f"; pairs {read_summary(dataset.card)}")
    return 0
