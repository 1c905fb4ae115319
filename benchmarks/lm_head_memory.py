"""Memory and time of the LM head and its cross-entropy in training: the whole [B, T, V]
logits (`token_nll` of the head's output, what the stages ran before) against
`head_token_nll` (logits only where a label is scored, `LOGITS_PER_CHUNK` of them at a
time, each chunk's recomputed in the backward), on the same hidden states, head and labels;
and the chunked head with the entropy metric beside the NLL (the PPO actor's loss).

Shapes are Llama 3.2 1B's head (hidden 2,048, vocabulary 128,256) by default, over one
micro-batch of `--batch` x `--seq` tokens whose first `--prompt` fraction of each row is a
prompt (no label), as in SFT with its prompt masked and in the paper's alignment stages.
Each variant runs forward and backward `--repeat` times, alternated, each time in a fresh
process: the peak is that process's high-water mark (CPU: resident set; CUDA: allocated)
above what it held with the inputs built, and the seconds are the best of the repeats.
Both variants' NLL and gradients are checked equal first, on a smaller shape.

    python benchmarks/lm_head_memory.py                      # CPU: 1 x 2,048 tokens
    python benchmarks/lm_head_memory.py --batch 4 --seq 4096 # on a GPU (bf16 autocast)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from functools import partial

import torch
from torch import nn

from offline_rlhf.data.tokenize import IGNORE_INDEX
from offline_rlhf.parallel.logprobs import head_token_nll, token_nll

VARIANTS = {"whole logits": lambda h, out, labels: token_nll(out(h), labels), "chunked head": head_token_nll,
            # the PPO actor's: the entropy metric of every scored position from the same chunks
            "chunked head + entropy": partial(head_token_nll, entropy=True)}


def inputs(batch: int, seq: int, dim: int, vocab: int, prompt: float, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, seq, dim, device=device, generator=gen).requires_grad_()
    head = nn.Linear(dim, vocab, bias=False, device=device)
    with torch.no_grad():
        head.weight.normal_(0, dim ** -0.5, generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)
    labels[:, :int(prompt * seq)] = IGNORE_INDEX
    return hidden, head, labels


def step(variant: str, hidden, head, labels) -> torch.Tensor:
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=hidden.is_cuda):
        nll, mask, *_ = VARIANTS[variant](hidden, head, labels)
        loss = (nll * mask).sum() / mask.sum()
    loss.backward()
    return loss


def high_water(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(variant: str, args) -> dict:
    """One forward and backward in this process: {seconds, peak bytes above the inputs}."""
    device = torch.device(args.device)
    hidden, head, labels = inputs(args.batch, args.seq, args.dim, args.vocab, args.prompt, device)
    before = high_water(device)
    start = time.perf_counter()
    step(variant, hidden, head, labels)
    peak = high_water(device)
    return {"seconds": time.perf_counter() - start, "peak_bytes": peak - before}


def check_equal(device: torch.device) -> None:
    results = []
    for variant in VARIANTS:
        hidden, head, labels = inputs(2, 300, 64, 5000, 0.4, device)
        loss = step(variant, hidden, head, labels)
        results.append((loss.detach(), hidden.grad, head.weight.grad))
    whole, *others = results
    for chunked in others:
        for got, want in zip(chunked, whole):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--prompt", type=float, default=0.5, help="fraction of each row without labels")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)  # a child process's variant
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    check_equal(torch.device(args.device))
    runs = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeat):
        for variant in VARIANTS:
            child = subprocess.run([sys.executable, *sys.argv, "--one", variant], check=True, capture_output=True,
                                   text=True)
            runs[variant].append(json.loads(child.stdout.strip().splitlines()[-1]))
    tokens = args.batch * args.seq
    print(f"{args.device}: {args.batch} x {args.seq} tokens ({args.prompt:.0%} prompt), dim {args.dim}, "
          f"vocabulary {args.vocab}; NLL and gradients equal")
    print("| variant | peak above inputs (GiB) | seconds (fwd + bwd) | tokens/s |")
    print("|---|---|---|---|")
    for variant, measured in runs.items():
        peak = max(run["peak_bytes"] for run in measured) / 2**30
        seconds = min(run["seconds"] for run in measured)
        print(f"| {variant} | {peak:.2f} | {seconds:.2f} | {tokens / seconds:,.0f} |")


if __name__ == "__main__":
    main()
