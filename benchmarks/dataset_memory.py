"""Memory and build time of a tokenized dataset held in memory (every training rank holds
the whole of it): token fields as `TokenIds` (4-byte C ints; a sequence keeps its
documents' lengths, not a position and a document id per token) against the tuples of
Python ints they replaced, kept here as `OldTokenizedSample`, `OldPackedSequence` and
`old_concat`. The same builders the stages call (`build_sft_dataset`, packed;
`build_preference_dataset`, one sequence per reply) run with each storage in the same
run, the old one by pointing tokenize.py and packing.py at the frozen copies, and every
sequence is checked identical (ids, labels, positions, document ids).

Input: the real hh-rlhf pairs of ../shared/data (harmless-base test-dev) repeated to
`--copies` copies, each copy's replies given a copy number (no two copies are the same
text); SFT takes each pair's prompt and chosen reply. Tokenizer: a byte-level BPE of
`--vocab` tokens trained here on that text (or `--tokenizer DIR`). Prints, per dataset,
tokens held, build seconds (best of `--repeat`, untraced, alternated), and bytes per
token measured by tracemalloc: `peak` (the build's high-water mark), `retained` (what the
dataset object holds once built: sequences, card, and for pairs each pair's example
text) and `sequences` (what the sequences alone hold); and the seconds `collate_sequences`
takes over all of them in batches of `--batch` against the tuple code's (`old_collate`),
its tensors checked equal.

    python benchmarks/dataset_memory.py --copies 4
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import torch

from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data import packing, tokenize
from offline_rlhf.data.batching import PAD_DOCUMENT, collate_sequences
from offline_rlhf.data.preference_dataset import build_preference_dataset
from offline_rlhf.data.preference_readers import read_hh_rlhf
from offline_rlhf.data.sft_dataset import build_sft_dataset
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test-dev.jsonl"


@dataclass(frozen=True)
class OldTokenizedSample:
    """tokenize.TokenizedSample before this change: tuples of ints."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    source: str
    truncated: bool

    def __post_init__(self):
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{self.source}: {len(self.input_ids)} input ids but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def response_tokens(self) -> int:
        return len(self.labels) - self.labels.count(tokenize.IGNORE_INDEX)


@dataclass(frozen=True)
class OldPackedSequence:
    """packing.PackedSequence before this change: four tuples of one length."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    positions: tuple[int, ...]
    document_ids: tuple[int, ...]

    def __post_init__(self):
        lengths = {len(self.input_ids), len(self.labels), len(self.positions), len(self.document_ids)}
        if len(lengths) != 1:
            raise ValueError(f"expected fields of one length, got lengths {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_documents(self) -> int:
        return self.document_ids[-1] + 1 if self.document_ids else 0


def old_concat(documents) -> OldPackedSequence:
    """packing._concat before this change."""
    input_ids, labels, positions, document_ids = [], [], [], []
    for index, document in enumerate(documents):
        input_ids.extend(document.input_ids)
        labels.extend(document.labels)
        positions.extend(range(len(document)))
        document_ids.extend([index] * len(document))
    return OldPackedSequence(tuple(input_ids), tuple(labels), tuple(positions), tuple(document_ids))


def old_collate(sequences, pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """batching.collate_sequences before this change."""
    longest = max(len(s.input_ids) for s in sequences)
    length = -(-longest // multiple_of) * multiple_of

    def padded(values, fill):
        return torch.tensor([list(v) + [fill] * (length - len(v)) for v in values], dtype=torch.long)

    return {
        "tokens": padded((s.input_ids for s in sequences), pad_id),
        "labels": padded((s.labels for s in sequences), tokenize.IGNORE_INDEX),
        "positions": padded((s.positions for s in sequences), 0),
        "document_ids": padded((s.document_ids for s in sequences), PAD_DOCUMENT),
    }


def collate_all(collate, sequences, batch: int) -> tuple[list[dict], float]:
    start = time.perf_counter()
    batches = [collate(sequences[i:i + batch], 0, 8) for i in range(0, len(sequences), batch)]
    return batches, time.perf_counter() - start


@contextlib.contextmanager
def storage(name: str):
    """The builders with the storage `name` ("old": the frozen copies above; "new": as is)."""
    if name == "new":
        yield
        return
    saved = tokenize.TokenIds, tokenize.TokenizedSample, packing._concat
    tokenize.TokenIds, tokenize.TokenizedSample, packing._concat = tuple, OldTokenizedSample, old_concat
    try:
        yield
    finally:
        tokenize.TokenIds, tokenize.TokenizedSample, packing._concat = saved


def sequences_of(dataset) -> list:
    items = dataset.train + dataset.val
    return [side for item in items for side in ((item.chosen, item.rejected) if hasattr(item, "chosen") else (item,))]


def layout(sequences) -> list[tuple]:
    return [tuple(map(tuple, (s.input_ids, s.labels, s.positions, s.document_ids))) for s in sequences]


def measure(build) -> tuple[object, dict[str, float]]:
    """The dataset `build()` returns and its bytes per token, measured by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    dataset = build()
    gc.collect()
    retained, peak = tracemalloc.get_traced_memory()
    sequences = sequences_of(dataset)
    tokens = sum(map(len, sequences))
    del dataset
    gc.collect()
    alone = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return sequences, {"tokens": tokens, "peak": (peak - base) / tokens, "retained": (retained - base) / tokens,
                       "sequences": (alone - base) / tokens}


def write_inputs(copies: int, folder: Path) -> tuple[Path, Path]:
    """hh-rlhf repeated `copies` times (replies numbered per copy), and its SFT view."""
    records = [json.loads(line) for line in HH.read_text().splitlines()]
    pairs_path, sft_path = folder / "hh.jsonl", folder / "sft.jsonl"
    with pairs_path.open("w") as out:
        for copy in range(copies):
            for record in records:
                out.write(json.dumps({side: f"{record[side]} [v{copy}]" for side in ("chosen", "rejected")}) + "\n")
    with sft_path.open("w") as out:
        for example in read_hh_rlhf(pairs_path, skips=Skips()):
            out.write(json.dumps({"prompt": example.prompt, "response": example.chosen}) + "\n")
    return pairs_path, sft_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4, help="copies of the 1,812 hh-rlhf records")
    parser.add_argument("--sft-len", type=int, default=1024, help="max_seq_len of the packed SFT dataset")
    parser.add_argument("--rm-len", type=int, default=512, help="max_seq_len of the preference pairs")
    parser.add_argument("--vocab", type=int, default=8000, help="size of the BPE tokenizer trained on the text")
    parser.add_argument("--tokenizer", help="a tokenizer folder (instead of training one)")
    parser.add_argument("--repeat", type=int, default=3, help="untraced builds of each storage, alternated, best kept")
    parser.add_argument("--batch", type=int, default=8, help="sequences per collated batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pairs_path, sft_path = write_inputs(args.copies, Path(tmp))
        tokenizer = Tokenizer.from_dir(args.tokenizer) if args.tokenizer else \
            train_bpe_tokenizer([pairs_path], args.vocab, Path(tmp) / "tok")
        builders = {
            f"sft packed (max_seq_len {args.sft_len})": lambda: build_sft_dataset(
                DataConfig(sources=[SourceConfig(name="hh", format="jsonl", path=str(sft_path))],
                           max_seq_len=args.sft_len, pack=True), tokenizer, seed=0, progress=False),
            f"rm pairs (max_seq_len {args.rm_len})": lambda: build_preference_dataset(
                DataConfig(sources=[SourceConfig(name="hh", format="hh_rlhf", path=str(pairs_path))],
                           max_seq_len=args.rm_len, pack=False), tokenizer, seed=0, progress=False),
        }
        print(f"hh-rlhf harmless-base x{args.copies}; tokenizer of {tokenizer.vocab_size} tokens", flush=True)
        for name, build in builders.items():
            seconds = {"old": [], "new": []}
            for _ in range(args.repeat):
                for which in seconds:
                    with storage(which):
                        gc.collect()
                        start = time.perf_counter()
                        build()
                        seconds[which].append(time.perf_counter() - start)
            held, stats, sequences = {}, {}, {}
            for which in ("old", "new"):
                with storage(which):
                    sequences[which], stats[which] = measure(build)
                held[which] = layout(sequences[which])
            assert held["old"] == held["new"], "the storages hold different sequences"
            del held["old"]
            collated, collate_seconds = {}, {"old": [], "new": []}
            for _ in range(args.repeat):
                for which, collate in (("old", old_collate), ("new", collate_sequences)):
                    collated[which], elapsed = collate_all(collate, sequences[which], args.batch)
                    collate_seconds[which].append(elapsed)
            assert all(batch.keys() == other.keys() and all(torch.equal(batch[k], other[k]) for k in batch)
                       for batch, other in zip(collated["old"], collated["new"], strict=True)), "collated differ"
            del sequences, collated
            old, new = stats["old"], stats["new"]
            print(f"{name}: {new['tokens']:,} tokens in {len(held['new']):,} sequences, identical in both\n"
                  f"  build (s, best of {args.repeat}): old {min(seconds['old']):.2f}, new {min(seconds['new']):.2f}"
                  f" (old {', '.join(f'{t:.2f}' for t in seconds['old'])}; "
                  f"new {', '.join(f'{t:.2f}' for t in seconds['new'])})\n"
                  f"  bytes/token peak: old {old['peak']:.1f}, new {new['peak']:.1f}\n"
                  f"  bytes/token retained by the dataset: old {old['retained']:.1f}, new {new['retained']:.1f}\n"
                  f"  bytes/token retained by the sequences alone: old {old['sequences']:.1f}, "
                  f"new {new['sequences']:.1f}\n"
                  f"  collate all in batches of {args.batch} (s, best of {args.repeat}, equal tensors): "
                  f"old {min(collate_seconds['old']):.3f}, new {min(collate_seconds['new']):.3f}", flush=True)


if __name__ == "__main__":
    main()
