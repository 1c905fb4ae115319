"""The reward-model dataset: read preference pairs, mix, split, tokenize both replies
of each pair; and its dataset card (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data.chat_template import ChatFormat, build_template
from offline_rlhf.data.errors import DataError, Location, UnusableRecord
from offline_rlhf.data.mixing import mix_sources
from offline_rlhf.data.packing import PackedSequence, unpacked
from offline_rlhf.data.preference_readers import PreferenceExample, read_preference_source
from offline_rlhf.data.sft_dataset import (
    PAIRS_KIND,
    dataset_card,
    read_card_fields,
    read_sources,
    reader_kwargs,
    source_name,
    split_by_content,
    with_read_stats,
)
from offline_rlhf.data.skips import Skips, describe
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import Reply, TokenStats, encode_replies
from offline_rlhf.progress import Progress, quiet_progress

Item = tuple[str, PreferenceExample]  # (source name, example)
IDENTICAL_AFTER_TRUNCATION = "identical after truncation"  # the skip reason of `encode_pair`


@dataclass(frozen=True)
class PreferencePair:
    """`prompt + chosen + EOS` and `prompt + rejected + EOS` as one-document sequences;
    the reward is read at each one's last token. `example` keeps the text for tracing."""

    chosen: PackedSequence
    rejected: PackedSequence
    example: PreferenceExample


@dataclass
class PreferenceDataset:
    train: list[PreferencePair]
    val: list[PreferencePair]
    card: dict


def encode_pair(tokenizer, template: ChatTemplate, example: PreferenceExample, max_len: int,
                stats: TokenStats, where: Location | None = None) -> PreferencePair:
    """Both replies through `encode_replies` (`encode_sft`'s EOS and truncation rule, one
    history for both sides), counted into `stats`. Raises UnusableRecord when truncation
    leaves the two sequences identical: such a pair has no signal and would count as a
    wrong ranking. It names `where` (the record's file and line), else `example.source`."""
    replies = [Reply(reply, True, example.source) for reply in (example.chosen, example.rejected)]
    chosen, rejected = encode_replies(tokenizer, template, example.prompt, replies, max_len, turns=example.turns)
    stats.add(chosen)
    stats.add(rejected)
    if chosen.input_ids == rejected.input_ids:
        # example.source is `{format}:{file name}:{line}`: the record, with no separate number.
        source, record = (where.source, where.record) if where is not None else (example.source, None)
        raise UnusableRecord(source, record, f"expected 'chosen' and 'rejected' to differ within "
                                             f"data.max_seq_len={max_len} tokens (identical after truncation)",
                             IDENTICAL_AFTER_TRUNCATION)
    return PreferencePair(*unpacked([chosen, rejected]), example)


def record_location(example: PreferenceExample, source: SourceConfig) -> Location | None:
    """The file and line of a file source's example, from its `source` tag
    (`{format}:{file name}:{line}`, which names the file without its folder); None for a
    hub split, whose tag already names it as its reading errors do."""
    tag = f"{source.format}:{Path(source.path).name}:"
    line = example.source.removeprefix(tag)
    return Location(source.path, int(line)) if source.format != "hf" and line != example.source and \
        line.isdigit() else None


def _encode_all(items: list[Item], tokenizer, template: ChatTemplate, max_len: int,
                stats: dict[str, TokenStats], skips: dict[str, Skips], sources: dict[str, SourceConfig],
                bar: Progress) -> list[PreferencePair]:
    """`encode_pair` every (source name, example); an unusable pair is counted into its
    source's skips (an error when strict, naming the record's file by its configured path)."""
    pairs = []
    for name, example in items:
        with skips[name].record():
            pairs.append(encode_pair(tokenizer, template, example, max_len, stats[name],
                                     record_location(example, sources[name])))
        bar.update()
    return pairs


def _with_encode_skips(read_stats: dict[str, dict], skips: dict[str, Skips],
                       mix_stats: dict[str, dict]) -> dict[str, dict]:
    """read_stats with the pairs `encode_pair` skipped added to each source's counts, so
    the card and the last line show them beside the skips of reading. A source whose
    every pair was skipped is an error naming it, as one whose every record was."""
    merged = {}
    for name, stats in read_stats.items():
        reasons = dict(stats["skip_reasons"])
        for reason, count in skips[name].counts.items():
            reasons[reason] = reasons.get(reason, 0) + count
        if skips[name].total and skips[name].total == mix_stats[name]["taken"]:
            raise DataError(name, None, f"expected at least one usable pair ({describe(skips[name].counts)}; "
                                        "raise data.max_seq_len, or data.strict=true names the first)")
        merged[name] = {**stats, "skipped": stats["skipped"] + skips[name].total, "skip_reasons": reasons}
    return merged


def pair_text(example: PreferenceExample) -> tuple[str, ...]:
    return example.prompt, example.chosen, example.rejected


def build_preference_dataset(cfg: DataConfig, tokenizer, seed: int,
                             template: ChatTemplate | ChatFormat | None = None,
                             progress: bool = True) -> PreferenceDataset:
    """Build train/val pairs from a `DataConfig`, in the SFT dataset's order of steps:
    read every source (identical or blank pairs skipped and counted unless cfg.strict;
    duplicates counted, dropped with cfg.dedupe); `mix_sources` (cfg.total_samples,
    weights); split over pair TEXT (a pair and its copies, at any line, stay on one
    side); `encode_pair` each pair with cfg.max_seq_len, rendered by `template` (default:
    cfg.template's). Pairs are never packed (cfg.pack is unused). Encoding shows progress
    on rank 0 when it takes more than a few seconds, unless `progress` is False (a stage's
    logging.progress)."""
    template = template or build_template(cfg.template, tokenizer.config)
    sources, read_stats = read_sources(
        cfg, lambda s, skips: read_preference_source(s.format, s.path, skips=skips,
                                                     **reader_kwargs(s, template, "preference")),
        pair_text)
    mixed, mix_stats = mix_sources(sources, cfg.total_samples, seed)
    train_items, val_items = split_by_content(mixed, cfg, seed, pair_text)
    stats = {name: TokenStats() for name in mix_stats}
    skips = {name: Skips(strict=cfg.strict) for name in mix_stats}
    configured = {source_name(source): source for source in cfg.sources}
    with quiet_progress("rm dataset", len(train_items) + len(val_items), "pair", progress) as bar:
        train, val = (_encode_all(items, tokenizer, template, cfg.max_seq_len, stats, skips, configured, bar)
                      for items in (train_items, val_items))
    read_stats = _with_encode_skips(read_stats, skips, mix_stats)
    dropped = {name: source_skips.counts.get(IDENTICAL_AFTER_TRUNCATION, 0) for name, source_skips in skips.items()}
    card = preference_card(cfg, seed, with_read_stats(mix_stats, read_stats), stats, dropped, train, val)
    return PreferenceDataset(train, val, {**card, **read_card_fields(cfg, read_stats)})


def preference_card(cfg: DataConfig, seed: int, mix_stats: dict[str, dict], stats: dict[str, TokenStats],
                    dropped: dict[str, int], train: list[PreferencePair], val: list[PreferencePair]) -> dict:
    """The SFT card's fields, counted for pairs: `taken` and `documents` count pairs,
    token counts cover both sequences of a pair (the prompt twice), `truncated` counts
    sequences, `skipped` includes the pairs `encode_pair` skipped, also counted alone as
    `identical_after_truncation`. Pairs are never packed: no packing fields."""
    with_dropped = {name: {**entry, "identical_after_truncation": dropped[name]} for name, entry in mix_stats.items()}
    sequences = [sequence for pair in train + val for sequence in (pair.chosen, pair.rejected)]
    card = dataset_card(cfg, seed, with_dropped, stats, sequences, [], len(train), len(val))
    card["train"]["sequences"], card["val"]["sequences"] = 2 * len(train), 2 * len(val)
    del card["pack"], card["packing_efficiency"]
    card["kind"] = PAIRS_KIND
    return card
