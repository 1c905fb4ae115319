"""`orlhf rm-score ckpt=RM input=in.jsonl output=out.jsonl`: every input record with
`reward_raw` added by the reward model, tokenized as the model was trained."""

from __future__ import annotations

from offline_rlhf.checkpoint import read_meta, resolve_checkpoint
from offline_rlhf.config.samples import RMScoreConfig
from offline_rlhf.fsutil import write_jsonl
from offline_rlhf.labeling.scoring import (
    encode_responses,
    load_reward_model,
    read_scoring_input,
    score_sequences,
    scoring_setup,
)
from offline_rlhf.progress import quiet_progress
from offline_rlhf.runtime import stage_runtime
from offline_rlhf.stage_support import mark_done

STAGE = "rm_score"


def main(cfg: RMScoreConfig) -> int:
    model_cfg = read_meta(resolve_checkpoint(cfg.ckpt)).model
    with stage_runtime(STAGE, cfg.run_dir, cfg.parallel, model_cfg, cfg) as (rt, usage):
        model, tokenizer, metadata = load_reward_model(cfg.ckpt, rt)
        template, max_len = scoring_setup(metadata, model_cfg, tokenizer)
        records, pairs, turns = read_scoring_input(cfg.input, cfg.prompt_key, cfg.response_key)
        # A generation cut at max_new_tokens (`finished: false`) is scored without EOS, as in `orlhf label`.
        sequences = encode_responses(tokenizer, template, pairs, max_len,
                                     [record.get("finished") is not False for record in records], turns)
        with quiet_progress("rm-score", len(sequences), "sample") as bar:  # counts every rank's
            scores = score_sequences(model, sequences, cfg.batch_size, rt, tokenizer.pad_id, bar)
        usage.tokens += sum(map(len, sequences))
        if rt.is_main:
            write_jsonl(cfg.output, [{**record, "reward_raw": score} for record, score in zip(records, scores)])
        mark_done(rt, cfg.output)  # a pipeline's rerun skips it (launcher.local.is_complete)
        rt.log(f"rm-score: {len(scores)} records scored -> {cfg.output}")
    return 0
