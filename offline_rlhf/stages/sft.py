"""`orlhf sft`: supervised fine-tuning (paper step 1, Eq. 1) into `run_dir/sft/`."""

from __future__ import annotations

from functools import partial

from offline_rlhf.checkpoint import TEMPLATE
from offline_rlhf.config.training import SFTConfig
from offline_rlhf.data.batching import collate_sequences, loss_tokens, real_tokens
from offline_rlhf.data.chat_template import build_template, template_record
from offline_rlhf.data.sft_dataset import build_sft_dataset, read_summary, write_dataset_card
from offline_rlhf.losses.sft import sft_loss
from offline_rlhf.models.masks import document_mask
from offline_rlhf.parallel.logprobs import model_token_nll
from offline_rlhf.runtime import stage_runtime
from offline_rlhf.stage_support import (
    check_checkpoint_resumable,
    local_init,
    mark_done,
    model_config,
    training_fingerprint,
)
from offline_rlhf.train.init import prepare_training
from offline_rlhf.train.loop import CheckpointSpec, Task, TrainData, train

STAGE = "sft"


def sft_task(packed: bool) -> Task:
    def loss(model, batch, normalizer):
        # Packed rows need the document mask; one-document rows are plain causal.
        mask = document_mask(batch["document_ids"]) if packed else None
        return sft_loss(*model_token_nll(model, batch, attn_mask=mask), normalizer)

    return Task(loss=loss, normalizer=loss_tokens, tokens=real_tokens)


def fixed_length(packed: bool, max_seq_len: int, rt) -> int | None:
    """Packed rows on CUDA all take max_seq_len (rounded up to the sequence multiple): their
    document masks go to FlexAttention, compiled for one shape (`compiled_flex_attention`),
    so each new length recompiled it and, past dynamo's limit of 8, training went on in
    FlexAttention's unfused path, which materializes every score. Packing fills rows to
    about that length anyway. None elsewhere: the longest row of each batch."""
    if not packed or rt.device.type != "cuda":
        return None
    multiple = rt.dims.sequence_multiple
    return -(-max_seq_len // multiple) * multiple


def main(cfg: SFTConfig) -> int:
    init = local_init(cfg.init, cfg.run_dir)  # a Hugging Face model is imported once, into the run
    model_cfg = model_config(init, cfg.model)
    with stage_runtime(STAGE, cfg.run_dir, cfg.parallel, model_cfg, cfg) as (rt, usage):
        setup = prepare_training(init, model_cfg, "lm", rt, cfg.train.seed)
        dataset = build_sft_dataset(cfg.data, setup.tokenizer, cfg.train.seed, progress=cfg.logging.progress)
        template = build_template(cfg.data.template, setup.tokenizer.config)  # recorded: later stages render alike
        fingerprint = training_fingerprint(cfg, dataset.train, init)
        check_checkpoint_resumable(setup.checkpoints, fingerprint)  # a refused rerun keeps the card
        if rt.is_main:
            write_dataset_card(dataset.card, rt.stage_dir)
        collate = partial(collate_sequences, pad_id=setup.tokenizer.pad_id, multiple_of=rt.dims.sequence_multiple,
                          length=fixed_length(cfg.data.pack, cfg.data.max_seq_len, rt))
        result = train(sft_task(cfg.data.pack), setup.model, TrainData(dataset.train, dataset.val, collate,
                                                                         cfg.data.max_seq_len),
                       cfg.train, cfg.optim, cfg.logging, rt, usage,
                       CheckpointSpec(setup.checkpoints, model_cfg, "lm", setup.tokenizer_path,
                                      fingerprint=fingerprint,
                                      metadata={TEMPLATE: template_record(template)}))
        totals = dataset.card["totals"]
        rt.log(f"sft done: {result.steps} steps, final checkpoint {result.checkpoint}; "
               f"{totals['truncated']} of {totals['taken']} samples were truncated to {cfg.data.max_seq_len} tokens; "
               f"records {read_summary(dataset.card)} (see {rt.stage_dir / 'dataset_card.md'})")
        mark_done(rt, result.checkpoint)
    return 0
