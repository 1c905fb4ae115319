"""The SFT dataset: read, mix, split, tokenize, pack; and its dataset card (no torch here)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data.chat_template import build_template
from offline_rlhf.data.errors import DataError
from offline_rlhf.data.hub_datasets import hub_options, source_key
from offline_rlhf.data.mixing import content_key, drop_duplicates, mix_sources, split_validation
from offline_rlhf.data.packing import PackedSequence, pack_samples, unpacked
from offline_rlhf.data.sft_readers import SFTExample, read_sft_source
from offline_rlhf.data.skips import Skips, describe
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import TokenizedSample, TokenStats, encode_sft
from offline_rlhf.progress import Progress, quiet_progress

CARD_JSON = "dataset_card.json"
CARD_MD = "dataset_card.md"
PAIRS_KIND = "preference pairs"  # a card's `kind` for the reward model's pairs (an SFT card has none)
# The field names a source of each kind configures for the generic JSONL reader (its parameters too).
READER_FIELDS = {"sft": ("prompt_key", "response_key"), "preference": ("prompt_key", "chosen_key", "rejected_key")}


@dataclass
class SFTDataset:
    train: list[PackedSequence]
    val: list[PackedSequence]
    card: dict


def source_name(source: SourceConfig) -> str:
    """The name a source is reported under: its `name`, else its path."""
    return source.name or source.path


def reader_kwargs(source: SourceConfig, template: ChatTemplate, kind: str) -> dict[str, Any]:
    """The keyword arguments of `source`'s reader of `kind` ("sft" or "preference"): the
    template; only for the generic JSONL reader, the field names (`READER_FIELDS`); for
    `hf`, its hub options (split...)."""
    names = {field: getattr(source, field) for field in READER_FIELDS[kind]} if source.format == "jsonl" else {}
    return {"template": template, **names, **hub_options(source, kind), **source_key(source, "data.sources")}


def read_sources(cfg: DataConfig, read_one: Callable[[SourceConfig, Skips], list],
                 text_of: Callable[[Any], tuple[str, ...]]) -> tuple[list[tuple], dict[str, dict]]:
    """Each source as (name, [(name, example)...], weight) for `mix_sources`, and per
    source {skipped, skip_reasons, duplicates} for the card. `read_one` reads one source's
    examples (SFT or preference readers), counting unusable records into its Skips
    (errors when cfg.strict); `text_of(example)` is the text that makes two examples
    duplicates (dropped when cfg.dedupe).

    Items carry their source name so the card can count tokens per source after mixing.
    """
    named, skipped = [], {}
    for source in cfg.sources:
        name, skips = source_name(source), Skips(strict=cfg.strict)
        examples = read_one(source, skips)
        if not examples and skips.total:
            raise DataError(source.path, None, f"expected at least one usable record ({describe(skips.counts)}; "
                                               "data.strict=true names the first)")
        named.append((name, [(name, example) for example in examples], source.weight))
        skipped[name] = skips.counts
    named, duplicates = drop_duplicates(named, lambda item: example_key(text_of(item[1])), cfg.dedupe)
    return named, {name: {"skipped": sum(skipped[name].values()), "skip_reasons": skipped[name],
                          "duplicates": duplicates[name]} for name in skipped}


def example_key(texts: tuple[str, ...]) -> str:
    """The split and dedupe identity of an example: its text, never its source line."""
    return content_key(*texts)


def split_by_content(mixed: list[tuple], cfg: DataConfig, seed: int, text_of: Callable[[Any], tuple[str, ...]]):
    # By content, not by item: an item holds its source line, so copies of one record
    # at different lines would otherwise land on both sides.
    return split_validation(mixed, cfg.val_fraction, seed, key=lambda item: example_key(text_of(item[1])))


def sft_text(example: SFTExample) -> tuple[str, ...]:
    return example.prompt, example.response


def _tokenize(items: list[tuple[str, SFTExample]], tokenizer, template: ChatTemplate, max_len: int,
              stats: dict[str, TokenStats], bar: Progress) -> list[TokenizedSample]:
    """`encode_sft` every (source name, example), counting into that source's stats and `bar`."""
    samples = []
    for name, example in items:
        sample = encode_sft(tokenizer, template, example.prompt, example.response, max_len, example.source,
                            turns=example.turns)
        stats[name].add(sample)
        samples.append(sample)
        bar.update()
    return samples


def _sequences(samples: list[TokenizedSample], cfg: DataConfig) -> list[PackedSequence]:
    return pack_samples(samples, cfg.max_seq_len) if cfg.pack else unpacked(samples)


def build_sft_dataset(cfg: DataConfig, tokenizer, seed: int, progress: bool = True) -> SFTDataset:
    """Build train/val sequences from a `DataConfig`.

    Order of steps: read every source; `mix_sources` (cfg.total_samples, weights);
    `split_validation` on examples, before packing, so no sequence mixes train and
    val documents; `encode_sft` each example with cfg.max_seq_len; pack train and
    val separately when cfg.pack, else one document per sequence. A source with no
    examples is an error naming it (raised by `mix_sources`). Tokenizing shows progress
    on rank 0 when it takes more than a few seconds, unless `progress` is False (a stage's
    logging.progress).
    """
    template = build_template(cfg.template, tokenizer.config)
    sources, read_stats = read_sources(
        cfg, lambda s, skips: read_sft_source(s.format, s.path, skips=skips, **reader_kwargs(s, template, "sft")),
        sft_text)
    mixed, mix_stats = mix_sources(sources, cfg.total_samples, seed)
    train_items, val_items = split_by_content(mixed, cfg, seed, sft_text)
    token_stats = {name: TokenStats() for name in mix_stats}
    with quiet_progress("sft dataset", len(train_items) + len(val_items), "example", progress) as bar:
        train, val = (_sequences(_tokenize(items, tokenizer, template, cfg.max_seq_len, token_stats, bar), cfg)
                      for items in (train_items, val_items))
    card = dataset_card(cfg, seed, with_read_stats(mix_stats, read_stats), token_stats, train, val,
                        len(train_items), len(val_items))
    return SFTDataset(train, val, {**card, **read_card_fields(cfg, read_stats)})


def with_read_stats(mix_stats: dict[str, dict], read_stats: dict[str, dict]) -> dict[str, dict]:
    """mix_stats per source plus its `skipped` and `duplicates` counts (card table columns)."""
    return {name: {**entry, "skipped": read_stats[name]["skipped"], "duplicates": read_stats[name]["duplicates"]}
            for name, entry in mix_stats.items()}


def read_card_fields(cfg: DataConfig, read_stats: dict[str, dict]) -> dict:
    """The card's `skip_reasons` per source ({reason: count}), `strict` and `dedupe`."""
    return {"skip_reasons": {name: stats["skip_reasons"] for name, stats in read_stats.items()},
            "strict": cfg.strict, "dedupe": cfg.dedupe}


def packing_efficiency(sequences: list[PackedSequence], seq_len: int) -> float:
    """Real tokens over the slots of `len(sequences)` sequences padded to seq_len."""
    return sum(map(len, sequences)) / (len(sequences) * seq_len) if sequences else 0.0


def dataset_card(cfg: DataConfig, seed: int, mix_stats: dict[str, dict], token_stats: dict[str, TokenStats],
                 train: list[PackedSequence], val: list[PackedSequence],
                 train_documents: int, val_documents: int) -> dict:
    """What went into the dataset: per-source and total counts, splits, packing."""
    # TokenStats.samples equals `taken`, so only its token counts are added.
    per_source = {
        name: {**mix, "tokens": token_stats[name].tokens, "response_tokens": token_stats[name].response_tokens,
               "truncated": token_stats[name].truncated}
        for name, mix in mix_stats.items()
    }
    totals = {key: sum(entry[key] for entry in per_source.values()) for key in next(iter(per_source.values()))}
    return {
        "sources": per_source,
        "totals": totals,
        "train": {"documents": train_documents, "sequences": len(train)},
        "val": {"documents": val_documents, "sequences": len(val)},
        "pack": cfg.pack,
        "packing_efficiency": packing_efficiency(train + val, cfg.max_seq_len),
        "max_seq_len": cfg.max_seq_len,
        "total_samples": cfg.total_samples,
        "val_fraction": cfg.val_fraction,
        "seed": seed,
        "template": asdict(cfg.template),
    }


def read_summary(card: dict) -> str:
    """`2 skipped (2 identical chosen and rejected), 49 duplicates (dropped)`: what reading
    left out or repeated, for a stage's last log line."""
    reasons: dict[str, int] = {}
    for counts in card.get("skip_reasons", {}).values():
        for reason, n in counts.items():
            reasons[reason] = reasons.get(reason, 0) + n
    duplicates = card["totals"].get("duplicates", 0)
    return f"{describe(reasons)}, {duplicates} duplicates ({'dropped' if card.get('dedupe') else 'kept'})"


def _card_markdown(card: dict) -> str:
    columns = ("available", "taken", "repeated", "skipped", "duplicates", "tokens", "response_tokens", "truncated")
    pairs = card.get("kind") == PAIRS_KIND
    documents = "pairs" if pairs else "documents"
    packing = "" if pairs else f", pack {card['pack']}, packing efficiency {card['packing_efficiency']:.1%}"
    lines = [
        "# Reward-model dataset card (preference pairs)" if pairs else "# SFT dataset card",
        "",
        f"- train: {card['train']['documents']} {documents} in {card['train']['sequences']} sequences",
        f"- val: {card['val']['documents']} {documents} in {card['val']['sequences']} sequences",
        f"- max_seq_len {card['max_seq_len']}{packing}, seed {card['seed']}",
        "",
        "| source | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    rows = [*card["sources"].items(), ("**total**", card["totals"])]
    lines += [f"| {name} | " + " | ".join(str(entry.get(key, 0)) for key in columns) + " |" for name, entry in rows]
    lines += ["", f"Read: {read_summary(card)}; strict {card.get('strict', False)}."]
    lines += [f"- {name}: {describe(counts)}" for name, counts in card.get("skip_reasons", {}).items() if counts]
    return "\n".join(lines) + "\n"


def write_dataset_card(card: dict, stage_dir: str | PathLike) -> None:
    """Write `dataset_card.json` (the full card) and `dataset_card.md` (a summary table)."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / CARD_JSON).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    (stage_dir / CARD_MD).write_text(_card_markdown(card))
