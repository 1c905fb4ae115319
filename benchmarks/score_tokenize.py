"""Tokenizing answers for scoring (what `orlhf label` does before its reward model runs):
`encode_scored`, which encodes the answers to one prompt together (the prompt once), against
the per-answer loop it replaced (`encode_sft` on each (prompt, answer) pair: the prompt
encoded again for every answer), on the same answers in the same run, alternated, best of
`--repeat`, every sample checked identical.

Input: the real hh-rlhf conversations of ../shared/data (harmless-base test-dev) as prompts,
each with `--answers` answers (its chosen and rejected replies and cut copies of them, as
generate's n samples per prompt), under the paper's template, tokenized by a byte-level BPE
trained here on that text.

    python benchmarks/score_tokenize.py --prompts 1500 --answers 4 --max-len 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from offline_rlhf.data.preference_readers import read_hh_rlhf
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_sft
from offline_rlhf.data.tokenizer import train_bpe_tokenizer
from offline_rlhf.labeling.scoring import encode_scored

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test-dev.jsonl"


def scored_answers(prompts: int, answers: int) -> list[tuple[str, str]]:
    """(prompt, answer) rows: each conversation's replies and cut copies, `answers` per prompt."""
    pairs = read_hh_rlhf(HH, skips=Skips())[:prompts]
    rows = []
    for pair in pairs:
        replies = [pair.chosen, pair.rejected]
        while len(replies) < answers:
            replies.append(replies[len(replies) % 2][: 20 * len(replies)])
        rows += [(pair.prompt, reply) for reply in replies[:answers]]
    return rows


def one_by_one(tokenizer, template, rows, max_len):
    return [encode_sft(tokenizer, template, prompt, answer, max_len, f"pair {index}")
            for index, (prompt, answer) in enumerate(rows)]


def together(tokenizer, template, rows, max_len):
    return encode_scored(tokenizer, template, rows, max_len, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1500)
    parser.add_argument("--answers", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, alternated, best kept")
    args = parser.parse_args()
    rows = scored_answers(args.prompts, args.answers)
    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "corpus.txt"
        corpus.write_text("\n".join(f"{prompt} {answer}" for prompt, answer in rows[::args.answers]))
        tokenizer = train_bpe_tokenizer([corpus], 8000, Path(folder) / "tokenizer")
    template, best = ChatTemplate(), {}
    for _ in range(args.repeat):
        for encode in (one_by_one, together):
            start = time.perf_counter()
            samples = encode(tokenizer, template, rows, args.max_len)
            best[encode.__name__] = min(best.get(encode.__name__, float("inf")), time.perf_counter() - start)
            best[f"{encode.__name__} samples"] = [(s.input_ids, s.labels, s.truncated) for s in samples]
    assert best["one_by_one samples"] == best["together samples"], "the two differ"
    print(f"{len(rows)} answers to {len(rows) // args.answers} prompts, max_len {args.max_len}: one by one "
          f"{best['one_by_one']:.2f} s, together {best['together']:.2f} s, "
          f"{best['one_by_one'] / best['together']:.2f}x; samples identical")


if __name__ == "__main__":
    main()
