"""The SFT dataset: read, mix, split, tokenize, pack; and its dataset card (no torch here)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data.mixing import mix_sources, split_validation
from offline_rlhf.data.packing import PackedSequence, pack_samples, unpacked
from offline_rlhf.data.sft_readers import SFTExample, read_sft_source
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import TokenizedSample, TokenStats, encode_sft

CARD_JSON = "dataset_card.json"
CARD_MD = "dataset_card.md"


@dataclass
class SFTDataset:
    train: list[PackedSequence]
    val: list[PackedSequence]
    card: dict


def source_name(source: SourceConfig) -> str:
    """The name a source is reported under: its `name`, else its path."""
    return source.name or source.path


def _reader_kwargs(source: SourceConfig, template: ChatTemplate) -> dict[str, Any]:
    # Only the keyed readers take field names; only `hf` takes a split.
    kwargs: dict[str, Any] = {"template": template}
    if source.format in ("jsonl", "hf"):
        kwargs.update(prompt_key=source.prompt_key, response_key=source.response_key)
    if source.format == "hf":
        kwargs["split"] = source.split
    return kwargs


def read_sources(sources: Sequence[SourceConfig], read_one: Callable[[SourceConfig], list]) -> list[tuple]:
    """Each source as (name, [(name, example)...], weight) for `mix_sources`; `read_one`
    reads one source's examples (SFT or preference readers).

    Items carry their source name so the card can count tokens per source after mixing.
    """
    named = []
    for source in sources:
        name = source_name(source)
        named.append((name, [(name, example) for example in read_one(source)], source.weight))
    return named


def _tokenize(items: list[tuple[str, SFTExample]], tokenizer, template: ChatTemplate, max_len: int,
              stats: dict[str, TokenStats]) -> list[TokenizedSample]:
    """`encode_sft` every (source name, example), counting into that source's stats."""
    samples = []
    for name, example in items:
        sample = encode_sft(tokenizer, template, example.prompt, example.response, max_len, example.source)
        stats[name].add(sample)
        samples.append(sample)
    return samples


def _sequences(samples: list[TokenizedSample], cfg: DataConfig) -> list[PackedSequence]:
    return pack_samples(samples, cfg.max_seq_len) if cfg.pack else unpacked(samples)


def build_sft_dataset(cfg: DataConfig, tokenizer, seed: int) -> SFTDataset:
    """Build train/val sequences from a `DataConfig`.

    Order of steps: read every source; `mix_sources` (cfg.total_samples, weights);
    `split_validation` on examples, before packing, so no sequence mixes train and
    val documents; `encode_sft` each example with cfg.max_seq_len; pack train and
    val separately when cfg.pack, else one document per sequence. A source with no
    examples is an error naming it (raised by `mix_sources`).
    """
    template = ChatTemplate(**asdict(cfg.template))
    sources = read_sources(cfg.sources, lambda s: read_sft_source(s.format, s.path, **_reader_kwargs(s, template)))
    mixed, mix_stats = mix_sources(sources, cfg.total_samples, seed)
    train_items, val_items = split_validation(mixed, cfg.val_fraction, seed)
    token_stats = {name: TokenStats() for name in mix_stats}
    train, val = (_sequences(_tokenize(items, tokenizer, template, cfg.max_seq_len, token_stats), cfg)
                  for items in (train_items, val_items))
    card = dataset_card(cfg, seed, mix_stats, token_stats, train, val, len(train_items), len(val_items))
    return SFTDataset(train, val, card)


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


def _card_markdown(card: dict) -> str:
    columns = ("available", "taken", "repeated", "tokens", "response_tokens", "truncated")
    lines = [
        "# SFT dataset card",
        "",
        f"- train: {card['train']['documents']} documents in {card['train']['sequences']} sequences",
        f"- val: {card['val']['documents']} documents in {card['val']['sequences']} sequences",
        f"- max_seq_len {card['max_seq_len']}, pack {card['pack']}, "
        f"packing efficiency {card['packing_efficiency']:.1%}, seed {card['seed']}",
        "",
        "| source | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    rows = [*card["sources"].items(), ("**total**", card["totals"])]
    lines += [f"| {name} | " + " | ".join(str(entry[key]) for key in columns) + " |" for name, entry in rows]
    return "\n".join(lines) + "\n"


def write_dataset_card(card: dict, stage_dir: str | PathLike) -> None:
    """Write `dataset_card.json` (the full card) and `dataset_card.md` (a summary table)."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / CARD_JSON).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    (stage_dir / CARD_MD).write_text(_card_markdown(card))
