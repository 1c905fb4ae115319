"""`orlhf align method=mle_filter|rwr|dt`: offline alignment (paper step 4) into
`run_dir/align_<method>/`, with the generic training loop.

- mle_filter (Eq. 4): token NLL on samples whose normalized reward exceeds t.
- rwr (Eq. 5): token NLL weighted per sample by exp(R / beta).
- dt (Eq. 6): token NLL with the reward prompt `<rm_score> a.b` after the assistant tag.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from typing import Sequence

import torch

from offline_rlhf.config.training import AlignConfig
from offline_rlhf.data.alignment_dataset import RewardedSequence, build_alignment_dataset
from offline_rlhf.data.batching import collate_sequences, loss_tokens, real_tokens
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.losses.alignment import kept_by_filter, mle_filter_loss, rwr_loss, rwr_normalizer
from offline_rlhf.losses.sft import sft_loss
from offline_rlhf.parallel.logprobs import token_nll
from offline_rlhf.runtime import stage_runtime
from offline_rlhf.stage_support import mark_done, model_config, resume_fingerprint
from offline_rlhf.train.init import prepare_training
from offline_rlhf.train.loop import CheckpointSpec, Task, TrainData, train


def collate_rewarded(items: Sequence[RewardedSequence], pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    batch = collate_sequences([item.sequence for item in items], pad_id, multiple_of)
    batch["rewards"] = torch.tensor([item.reward for item in items], dtype=torch.float32)
    return batch


def _token_nll(model, batch):
    logits = model(batch["tokens"], positions=batch["positions"])  # one document per row: plain causal
    return token_nll(logits, batch["labels"])


def alignment_task(cfg: AlignConfig) -> Task:
    if cfg.method == "mle_filter":
        def kept_tokens(batch):
            kept = kept_by_filter(batch["rewards"], cfg.filter_threshold)
            return int(((batch["labels"][:, 1:] != -100) & kept.unsqueeze(1)).sum())

        return Task(loss=lambda m, b, n: mle_filter_loss(*_token_nll(m, b), b["rewards"], cfg.filter_threshold, n),
                    normalizer=kept_tokens, tokens=real_tokens,
                    derive=lambda m: {"kept_fraction": m["count/kept"] / max(m["count/samples"], 1.0)})
    if cfg.method == "rwr":
        return Task(loss=lambda m, b, n: rwr_loss(*_token_nll(m, b), b["rewards"], cfg.rwr_beta, n),
                    normalizer=lambda b: rwr_normalizer(b["labels"], b["rewards"], cfg.rwr_beta, cfg.rwr_normalize),
                    tokens=real_tokens,
                    derive=lambda m: {"ess_fraction": m["count/ess"] / max(m["count/samples"], 1.0)})
    return Task(loss=lambda m, b, n: sft_loss(*_token_nll(m, b), n), normalizer=loss_tokens, tokens=real_tokens)


def main(cfg: AlignConfig) -> int:
    model_cfg = model_config(cfg.init, cfg.model)
    with stage_runtime(cfg.stage_name, cfg.run_dir, cfg.parallel, model_cfg, cfg) as (rt, usage):
        setup = prepare_training(cfg.init, model_cfg, "lm", rt, cfg.train.seed)
        template = ChatTemplate(**asdict(cfg.data.template))
        dataset = build_alignment_dataset(cfg.data.path, setup.tokenizer, template, cfg.data.max_seq_len,
                                          cfg.data.val_fraction, cfg.train.seed, reward_prompt=cfg.method == "dt",
                                          reward_key=cfg.data.reward_key)
        rt.log(dataset_summary(cfg, dataset))
        collate = partial(collate_rewarded, pad_id=setup.tokenizer.pad_id, multiple_of=rt.dims.sequence_multiple)
        metadata = {"alignment": {"method": cfg.method, "dt_target": cfg.dt_target if cfg.method == "dt" else None,
                                  "dataset": dataset.card}}
        result = train(alignment_task(cfg), setup.model,
                       TrainData(dataset.train, dataset.val, collate, seq_len=cfg.data.max_seq_len),
                       cfg.train, cfg.optim, cfg.logging, rt, usage,
                       CheckpointSpec(setup.checkpoints, model_cfg, "lm", setup.tokenizer_path,
                                      final_metadata=lambda _: metadata, fingerprint=resume_fingerprint(cfg)))
        rt.log(f"{cfg.stage_name} done: {result.steps} steps, final checkpoint {result.checkpoint}; "
               f"{dataset.card['tokens']['truncated']} of {dataset.card['examples']} samples truncated to "
               f"{cfg.data.max_seq_len} tokens")
        mark_done(rt, result.checkpoint)
    return 0


def dataset_summary(cfg: AlignConfig, dataset) -> str:
    rewards = dataset.card["train_rewards"]
    line = (f"{cfg.method}: {rewards['count']} training samples, normalized reward mean {rewards['mean']:.3f} "
            f"std {rewards['std']:.3f}")
    if cfg.method == "mle_filter":
        kept = sum(item.reward > cfg.filter_threshold for item in dataset.train)
        line += f"; {kept} ({kept / len(dataset.train):.1%}) pass the filter R > {cfg.filter_threshold}"
    return line
