"""`orlhf align method=mle_filter|rwr|dt|dpo|ipo|cdpo`: offline alignment (paper step 4)
into `run_dir/align_<method>/`, with the generic training loop.

- mle_filter (Eq. 4): token NLL on samples whose normalized reward exceeds t (the others
  are dropped before batching, so they cost no compute and do not count towards the steps).
- rwr (Eq. 5): token NLL weighted per sample by exp(R / beta).
- dt (Eq. 6): token NLL with the reward prompt `<rm_score> a.b` after the assistant tag.
- dpo, ipo, cdpo (losses/preference.py): on the pairs of `orlhf reference`, whose
  reference log-probs were computed offline, so no second model is held in memory; a pair
  is one training unit (global batch, normalization).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

from offline_rlhf.checkpoint import TEMPLATE, resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.training import PREFERENCE_METHODS, AlignConfig
from offline_rlhf.data.alignment_dataset import RewardedSequence, build_alignment_dataset
from offline_rlhf.data.batching import collate_sequences, loss_tokens, real_tokens
from offline_rlhf.data.chat_template import ChatFormat, template_record
from offline_rlhf.data.pair_dataset import ReferencedPair, build_pair_dataset
from offline_rlhf.data.skips import describe
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.labeling.pairs import response_logps
from offline_rlhf.losses.alignment import (
    MAX_LOG_WEIGHT,
    kept_by_filter,
    mle_filter_loss,
    rwr_loss,
    rwr_normalizer,
)
from offline_rlhf.losses.preference import preference_loss
from offline_rlhf.losses.sft import sft_loss
from offline_rlhf.parallel.logprobs import model_token_nll
from offline_rlhf.runtime import stage_runtime
from offline_rlhf.stage_checks import load_tokenizer
from offline_rlhf.stage_support import init_template, local_init, mark_done, model_config, training_fingerprint
from offline_rlhf.train.init import prepare_training
from offline_rlhf.train.loop import CheckpointSpec, Task, TrainData, train


def collate_referenced(pairs: Sequence[ReferencedPair], pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Rows [c0..cn-1, r0..rn-1] (one forward gives both sides) and the reference log-prob sums [n]."""
    batch = collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, multiple_of)
    batch["ref_chosen"] = torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float64)
    batch["ref_rejected"] = torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float64)
    return batch


def preference_task(cfg: AlignConfig) -> Task:
    def loss(model, batch, normalizer):
        chosen, rejected = response_logps(model, batch).chunk(2)
        return preference_loss(cfg.method, chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], cfg.beta,
                               normalizer, cfg.label_smoothing)

    return Task(loss=loss, normalizer=lambda b: len(b["ref_chosen"]), tokens=real_tokens)


def collate_rewarded(items: Sequence[RewardedSequence], pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    batch = collate_sequences([item.sequence for item in items], pad_id, multiple_of)
    # float64, as the dataset's filter compared them: a reward just above the threshold that
    # float32 rounds onto it would be kept there and dropped by the loss's own filter.
    batch["rewards"] = torch.tensor([item.reward for item in items], dtype=torch.float64)
    return batch


def alignment_task(cfg: AlignConfig) -> Task:
    if cfg.method in PREFERENCE_METHODS:
        return preference_task(cfg)
    if cfg.method == "mle_filter":
        def kept_tokens(batch):
            kept = kept_by_filter(batch["rewards"], cfg.filter_threshold)
            return int(((batch["labels"][:, 1:] != -100) & kept.unsqueeze(1)).sum())

        return Task(loss=lambda m, b, n: mle_filter_loss(*model_token_nll(m, b), b["rewards"], cfg.filter_threshold, n),
                    normalizer=kept_tokens, tokens=real_tokens,
                    derive=lambda m: {"kept_fraction": m["count/kept"] / max(m["count/samples"], 1.0)})
    if cfg.method == "rwr":
        return Task(loss=lambda m, b, n: rwr_loss(*model_token_nll(m, b), b["rewards"], cfg.rwr_beta, n),
                    normalizer=lambda b: rwr_normalizer(b["labels"], b["rewards"], cfg.rwr_beta, cfg.rwr_normalize),
                    tokens=real_tokens, derive=global_ess)
    return Task(loss=lambda m, b, n: sft_loss(*model_token_nll(m, b), n), normalizer=loss_tokens, tokens=real_tokens)


def global_ess(m: dict[str, float]) -> dict[str, float]:
    """Kish's effective sample size (sum w)^2 / sum w^2 over the global batch, from the
    global sums; it replaces the loss's per-call `count/ess`, whose sum over micro-batches
    reads G (fraction 1.0) at micro-batch 1 whatever the weights."""
    ess = m["count/weight_sum"] ** 2 / max(m["count/weight_sq_sum"], 1e-12)
    return {"count/ess": ess, "ess_fraction": ess / max(m["count/samples"], 1.0)}


def check_reference_model(pairs: Path, init) -> None:
    """The pairs' reference log-probs must be the policy's own at its start (DPO's ratio is
    against them): `orlhf reference`'s card next to them names the checkpoint that scored
    them, which must be the one init.checkpoint resolves to now (an SFT that trained on
    since would make them another model's). A checkpoint inside the reference's run is
    looked for where that run is now (a run folder moves whole). Pairs without a card are
    taken as given."""
    card_path = pairs.parent / "dataset_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    if card.get("model") is None:
        return
    in_run = card.get("model_in_run")
    scored_by = pairs.parent.parent / in_run if in_run else Path(card["model"])
    start = resolve_checkpoint(init.checkpoint, "init.checkpoint")
    if scored_by.resolve() != start.resolve():
        raise ConfigError("init.checkpoint", f"resolves to {start}, but the reference log-probs in {pairs} were "
                          f"computed by {scored_by} (its dataset_card.json)",
                          "rerun `orlhf reference` from this init.checkpoint, or point init.checkpoint at that one")


def main(cfg: AlignConfig) -> int:
    if cfg.method in PREFERENCE_METHODS and not Path(cfg.data.pairs).is_file():
        raise ConfigError("data.pairs", f"{cfg.data.pairs} does not exist: method={cfg.method} trains on "
                          "pairs with reference log-probs", "run `orlhf reference` first (it writes them)")
    init = local_init(cfg.init, cfg.run_dir)  # a Hugging Face model is imported once, into the run
    if cfg.method in PREFERENCE_METHODS:
        check_reference_model(Path(cfg.data.pairs), init)
    model_cfg = model_config(init, cfg.model)
    # The init (SFT) checkpoint's template, recorded again (later stages render alike);
    # a config asking for another fails here, before any weights load.
    template = init_template(init, cfg.data.template, "data.template", load_tokenizer(init, model_cfg)[0].config)
    with stage_runtime(cfg.stage_name, cfg.run_dir, cfg.parallel, model_cfg, cfg) as (rt, usage):
        setup = prepare_training(init, model_cfg, "lm", rt, cfg.train.seed)
        dataset, collate = training_data(cfg, setup.tokenizer, template, rt)
        metadata = {"alignment": {"method": cfg.method, "dt_target": cfg.dt_target if cfg.method == "dt" else None,
                                  "dataset": dataset.card}}
        result = train(alignment_task(cfg), setup.model,
                       TrainData(dataset.train, dataset.val, collate, seq_len=cfg.data.max_seq_len),
                       cfg.train, cfg.optim, cfg.logging, rt, usage,
                       CheckpointSpec(setup.checkpoints, model_cfg, "lm", setup.tokenizer_path,
                                      final_metadata=lambda _: metadata,
                                      fingerprint=training_fingerprint(cfg, dataset.train, init),
                                      metadata={TEMPLATE: template_record(template)}))
        rt.log(f"{cfg.stage_name} done: {result.steps} steps, final checkpoint {result.checkpoint}; "
               f"{dataset.card['tokens']['truncated']} of {dataset.card['tokens']['samples']} sequences "
               f"truncated to {cfg.data.max_seq_len} tokens")
        mark_done(rt, result.checkpoint)
    return 0


def training_data(cfg: AlignConfig, tokenizer, template: ChatTemplate | ChatFormat, rt):
    """The method's dataset (reward-labeled samples, or pairs with reference log-probs),
    encoded with `template`, and its collate function."""
    if cfg.method in PREFERENCE_METHODS:
        dataset = build_pair_dataset(cfg.data.pairs, tokenizer, template, cfg.data.max_seq_len,
                                     cfg.data.val_fraction, cfg.train.seed)
        rt.log(f"{cfg.method}: {len(dataset.train)} training pairs, {len(dataset.val)} validation pairs "
               f"from {cfg.data.pairs} (beta {cfg.beta})")
        return dataset, partial(collate_referenced, pad_id=tokenizer.pad_id, multiple_of=rt.dims.sequence_multiple)
    dataset = build_alignment_dataset(cfg.data.path, tokenizer, template, cfg.data.max_seq_len,
                                      cfg.data.val_fraction, cfg.train.seed, reward_prompt=cfg.method == "dt",
                                      reward_key=cfg.data.reward_key,
                                      keep_above=cfg.filter_threshold if cfg.method == "mle_filter" else None,
                                      strict=cfg.data.strict, progress=cfg.logging.progress)
    rt.log(dataset_summary(cfg, dataset))
    if cfg.method == "rwr":
        warn_clamped(cfg, dataset, rt.log)
    if cfg.method == "dt":
        warn_unseen_target(cfg, dataset.card["train_rewards"], rt.log)
    return dataset, partial(collate_rewarded, pad_id=tokenizer.pad_id, multiple_of=rt.dims.sequence_multiple)


def dataset_summary(cfg: AlignConfig, dataset) -> str:
    rewards = dataset.card["train_rewards"]
    line = (f"{cfg.method}: {rewards['count']} training samples, normalized reward mean {rewards['mean']:.3f} "
            f"std {rewards['std']:.3f}")
    if cfg.method == "mle_filter":
        kept, dropped = len(dataset.train), dataset.card["filter"]["train_filtered"]
        line += (f"; {kept} ({kept / (kept + dropped):.1%}) pass the filter R > {cfg.filter_threshold} and are "
                 f"trained on, {dropped} filtered out")
    if dataset.card["skipped"]:
        line += f"; {describe(dataset.card['skipped'])} records of {cfg.data.path}"
    return line


def warn_unseen_target(cfg: AlignConfig, rewards: dict, log) -> None:
    """DT is asked at inference for `dt_target` (Eq. 6's R*): a reward prompt outside every
    training reward is one the model never saw; it may or may not extrapolate."""
    if not rewards["min"] <= cfg.dt_target <= rewards["max"]:
        log(f"note: dt_target={cfg.dt_target:g} (the reward prompt eval and serve use) lies outside the training "
            f"rewards [{rewards['min']:.2f}, {rewards['max']:.2f}]; the model never saw it in training; a target "
            "near the best rewards (e.g. their 90th percentile) is the conservative choice")


def warn_clamped(cfg: AlignConfig, dataset, log) -> None:
    """Above the clamp every sample weighs exp(MAX_LOG_WEIGHT): RWR no longer ranks them."""
    clamped = sum(item.reward / cfg.rwr_beta > MAX_LOG_WEIGHT for item in dataset.train)
    if clamped:
        log(f"rwr: warning: {clamped} of {len(dataset.train)} training samples have reward / rwr_beta above the "
            f"log-weight clamp {MAX_LOG_WEIGHT:g} and all weigh exp({MAX_LOG_WEIGHT:g}); raise rwr_beta (rewards "
            f"should be normalized z-scores)")
