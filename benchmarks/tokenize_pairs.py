"""Tokenizing preference pairs (the reward-model dataset's `encode_pair` work): the current
`encode_replies` against the code it replaced, kept here as `reference_replies` (each
reply's prompt encoded on its own, again after every dropped exchange, and `adds_bos`
asked of the backend for every prompt), on the same pairs in the same run, with every
sample checked identical (ids, labels, truncation flag).

Input: the real hh-rlhf pairs of ../shared/data (harmless-base test-dev, 1,808 usable
pairs) repeated to `--pairs`, each copy's replies given a copy number (so no two copies
are the same text), read by `read_hh_rlhf` and tokenized by a byte-level BPE
tokenizer trained here on that text (or `--tokenizer DIR`). Prints, per max_seq_len, the
seconds of each implementation, the speedup, the backend encode calls per pair, and how
many exchanges the pairs dropped.

    python benchmarks/tokenize_pairs.py --pairs 20000 --max-len 64 512
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

from offline_rlhf.data.preference_readers import read_hh_rlhf
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import IGNORE_INDEX, Reply, _Labelled, encode_replies
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test-dev.jsonl"


class CountingBackend:
    """A `tokenizers.Tokenizer` that counts its `encode` calls."""

    def __init__(self, backend):
        self.backend, self.calls = backend, 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.backend.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def reference_adds_bos(tokenizer) -> bool:
    if "add_bos_token" in tokenizer.config:
        return bool(tokenizer.config["add_bos_token"]) and tokenizer.bos_id is not None
    return tokenizer.bos_id is not None and \
        tokenizer.backend.encode("a", add_special_tokens=True).ids[:1] == [tokenizer.bos_id]


def reference_replies(tokenizer, template, prompt, replies, max_len, response_prefix="", turns=()):
    """The paper template's `encode_replies` before this change."""

    def labeller(reply):
        response = tokenizer.encode(template.response_text(reply.text)) + ([tokenizer.eos_id] if reply.eos else [])

        def labelled(kept):
            instruction = template.fold_history(kept) if kept else prompt
            ids = tokenizer.encode(template.prompt_text(instruction) + response_prefix,
                                   add_bos=reference_adds_bos(tokenizer))
            return _Labelled(ids + response, [IGNORE_INDEX] * len(ids) + response, len(ids))

        return labelled

    labellers = [labeller(reply) for reply in replies]
    dropped, samples = 0, [label(turns) for label in labellers]
    while dropped + 2 < len(turns) and not all(sample.prompt_whole(max_len) for sample in samples):
        dropped += 2
        samples = [label(turns[dropped:]) for label in labellers]
    return [sample.cut(max_len, reply.source, dropped > 0) for sample, reply in zip(samples, replies)]


def hh_pairs(count: int, folder: Path):
    records = [json.loads(line) for line in HH.read_text().splitlines()]
    path = folder / "hh.jsonl"
    with path.open("w") as out:
        for index in range(count + count // 50):  # a few are skipped (identical or blank replies)
            record = records[index % len(records)]
            out.write(json.dumps({side: f"{record[side]} [v{index}]" for side in ("chosen", "rejected")}) + "\n")
    return read_hh_rlhf(path, skips=Skips())[:count], path


def run(encode, tokenizer, template, pairs, max_len):
    start, calls = time.perf_counter(), tokenizer.backend.calls
    out = [encode(tokenizer, template, p.prompt, [Reply(p.chosen, True, "c"), Reply(p.rejected, True, "r")],
                  max_len, "", p.turns) for p in pairs]
    return out, time.perf_counter() - start, tokenizer.backend.calls - calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--max-len", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: a 8,000-token BPE trained on the pairs)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, alternated, best kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pairs, path = hh_pairs(args.pairs, Path(tmp))
        tokenizer = Tokenizer.from_dir(args.tokenizer) if args.tokenizer else \
            train_bpe_tokenizer([path], 8000, Path(tmp) / "tok")
    tokenizer.backend = CountingBackend(tokenizer.backend)
    template = ChatTemplate()
    turns = sum(len(p.turns) for p in pairs) / len(pairs)
    print(f"{len(pairs)} hh-rlhf pairs, {turns:.2f} turns per prompt on average, tokenizer of "
          f"{tokenizer.vocab_size} tokens")
    for max_len in args.max_len:
        seconds, calls = {"before": [], "after": []}, {}
        for repeat in range(args.repeat):  # alternated, each run's samples freed before the next is timed
            samples = {}
            for name, encode in (("before", reference_replies), ("after", encode_replies)):
                gc.collect()
                samples[name], elapsed, calls[name] = run(encode, tokenizer, template, pairs, max_len)
                seconds[name].append(elapsed)
                if repeat:
                    del samples[name]
            if not repeat:
                assert [[(s.input_ids, s.labels, s.truncated) for s in pair] for pair in samples["before"]] == \
                    [[(s.input_ids, s.labels, s.truncated) for s in pair] for pair in samples["after"]], "differ"
                cut = sum(pair[0].truncated for pair in samples["after"])
            del samples
        before, after = min(seconds["before"]), min(seconds["after"])
        print(f"max_seq_len {max_len}: before {before:.2f} s ({calls['before'] / len(pairs):.1f} backend encodes "
              f"per pair), after {after:.2f} s ({calls['after'] / len(pairs):.1f}); speedup {before / after:.2f}x; "
              f"identical samples; {cut} pairs truncated (best of {args.repeat} runs: before "
              f"{', '.join(f'{t:.2f}' for t in seconds['before'])}; "
              f"after {', '.join(f'{t:.2f}' for t in seconds['after'])})", flush=True)


if __name__ == "__main__":
    main()
