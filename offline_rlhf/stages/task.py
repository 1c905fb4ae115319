"""`orlhf task`: write the embedded task to `run_dir/task/`.

Outputs: sft.jsonl (mixed-quality demonstrations), preferences.jsonl (Bradley-Terry
labels on the gold reward), gen_prompts.jsonl, eval_prompts.jsonl (held out by
instruction string), tokenizer/ (byte-level BPE trained on all of it), task_card.json,
config.yaml, and DONE last. DONE holds the config, so a rerun with the same config skips.
Imports no torch: this stage only writes text.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from offline_rlhf.config.compose import to_yaml
from offline_rlhf.config.tools import TaskConfig
from offline_rlhf.data.embedded_task import (
    FAMILY_NAMES,
    QUALITIES,
    bt_probability,
    preference_rows,
    prompt_rows,
    quality_mix,
    sample_prompt,
    sft_rows,
    split_instructions,
)
from offline_rlhf.data.template import REWARD_TAG, ChatTemplate
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from offline_rlhf.fsutil import write_atomic, write_jsonl
from offline_rlhf.host import claim_stage, release_stage_lock

STAGE = "task"
SFT, PREFERENCES = "sft.jsonl", "preferences.jsonl"
GEN_PROMPTS, EVAL_PROMPTS = "gen_prompts.jsonl", "eval_prompts.jsonl"
TOKENIZER_DIR, CORPUS, CARD, DONE = "tokenizer", "tokenizer_corpus.txt", "task_card.json", "DONE"


def _rng(cfg: TaskConfig, stream: str) -> random.Random:
    # One stream per output, so changing one size leaves the other files unchanged.
    return random.Random(f"{cfg.seed}:{stream}")


def generate(cfg: TaskConfig) -> dict[str, list[dict]]:
    """Every JSONL file's rows, keyed by file name; a pure function of the config."""
    pools, held_out = split_instructions(cfg.n_eval_prompts, _rng(cfg, "split"))
    gen_rng = _rng(cfg, "gen_prompts")
    return {
        SFT: sft_rows(cfg.n_sft, quality_mix(cfg.good_fraction, cfg.flaw_weights), pools, _rng(cfg, "sft")),
        PREFERENCES: preference_rows(cfg.n_preferences, cfg.bt_temperature, pools, _rng(cfg, "preferences")),
        GEN_PROMPTS: prompt_rows([sample_prompt(pools, gen_rng) for _ in range(cfg.n_gen_prompts)]),
        EVAL_PROMPTS: prompt_rows(held_out),
    }


def corpus_lines(files: dict[str, list[dict]], template: ChatTemplate = ChatTemplate()) -> Iterable[str]:
    """The text the tokenizer is trained on, rendered as training will render it. Every
    demonstration also appears with the Decision-Transformer reward prompt, so `<rm_score>`
    and one-decimal scores get merges of their own."""
    for row in files[SFT]:
        prompt, response = template.prompt_text(row["prompt"]), template.response_text(row["response"])
        yield prompt + response
        yield prompt + template.reward_prompt(row["gold_reward"]) + response
    for row in files[PREFERENCES]:
        for key in ("chosen", "rejected"):
            yield template.prompt_text(row["prompt"]) + template.response_text(row[key])
    for row in files[GEN_PROMPTS] + files[EVAL_PROMPTS]:
        yield template.prompt_text(row["prompt"])


def _by_quality(scored: Iterable[tuple[str, float]]) -> dict[str, dict]:
    rewards = defaultdict(list)
    for quality, reward in scored:
        rewards[quality].append(reward)
    return {quality: {"count": len(rewards[quality]),
                      "mean_gold_reward": sum(rewards[quality]) / len(rewards[quality]) if rewards[quality] else None}
            for quality in QUALITIES}


def _preference_summary(rows: list[dict], temperature: float) -> dict:
    """How often the label agrees with the gold ordering, and how often Bradley-Terry says it should."""
    gaps = [abs(row["chosen_gold_reward"] - row["rejected_gold_reward"]) for row in rows]
    agree = sum(row["chosen_gold_reward"] > row["rejected_gold_reward"] for row in rows)
    responses = [(row[f"{side}_quality"], row[f"{side}_gold_reward"])
                 for row in rows for side in ("chosen", "rejected")]
    return {"count": len(rows), "agreement_with_gold": agree / len(rows),
            "expected_agreement": sum(bt_probability(gap, 0.0, temperature) for gap in gaps) / len(rows),
            "responses_by_quality": _by_quality(responses)}


def task_card(cfg: TaskConfig, files: dict[str, list[dict]], tokenizer: Tokenizer) -> dict:
    """Counts and mean gold reward per quality, prompts per family, tokenizer facts."""
    sft = files[SFT]

    def by_family(rows):
        counts = Counter(row["family"] for row in rows)
        return {name: counts[name] for name in FAMILY_NAMES}

    return {
        "sft": {"count": len(sft), "mean_gold_reward": sum(row["gold_reward"] for row in sft) / len(sft),
                "by_quality": _by_quality((row["quality"], row["gold_reward"]) for row in sft)},
        "preferences": _preference_summary(files[PREFERENCES], cfg.bt_temperature),
        "gen_prompts": {"count": len(files[GEN_PROMPTS]), "by_family": by_family(files[GEN_PROMPTS])},
        "eval_prompts": {"count": len(files[EVAL_PROMPTS]), "by_family": by_family(files[EVAL_PROMPTS])},
        "tokenizer": {"vocab_size": tokenizer.vocab_size,
                      "reward_prompt_tokens": len(tokenizer.encode(ChatTemplate().reward_prompt(5.0)))},
        "reward_tag": REWARD_TAG,
    }


def _fingerprint(cfg: TaskConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


def main(cfg: TaskConfig) -> int:
    out = Path(cfg.run_dir) / STAGE
    done = out / DONE
    if done.is_file() and done.read_text() == _fingerprint(cfg):
        print(f"task: {out} already holds this config; skipped")
        return 0
    lock, note = claim_stage(out, STAGE)  # made, proven writable, and locked: two writers would interleave the files
    try:
        if note:
            print(note, flush=True)
        write_task(cfg, out)
    finally:
        release_stage_lock(lock)
    return 0


def write_task(cfg: TaskConfig, out: Path) -> None:
    done = out / DONE
    # A stale marker must not outlive a partial rewrite.
    done.unlink(missing_ok=True)
    start = time.monotonic()
    files = generate(cfg)
    for name, rows in files.items():
        write_jsonl(out / name, rows)
    write_atomic(out / CORPUS, "".join(line + "\n" for line in corpus_lines(files)))
    tokenizer = train_bpe_tokenizer([out / CORPUS], cfg.vocab_size, out / TOKENIZER_DIR)
    card = task_card(cfg, files, tokenizer)
    write_atomic(out / CARD, json.dumps(card, indent=2) + "\n")
    write_atomic(out / "config.yaml", to_yaml(cfg))
    write_atomic(done, _fingerprint(cfg))
    print(f"task: wrote {out} in {time.monotonic() - start:.1f}s: {len(files[SFT])} demonstrations "
          f"(mean gold reward {card['sft']['mean_gold_reward']:.2f}), {len(files[PREFERENCES])} pairs "
          f"({card['preferences']['agreement_with_gold']:.0%} agree with the gold reward), "
          f"{len(files[GEN_PROMPTS])} generation and {len(files[EVAL_PROMPTS])} held-out evaluation prompts, "
          f"{tokenizer.vocab_size}-token tokenizer")
