"""Where a decode step's time goes: our engine on a ~1B model in bf16 (fused projections,
as `orlhf generate` loads it), one batch, under torch.profiler (CUDA only). Prints:

- the wall time per decode step, and the GPU kernel time per step (runs of 1 and of
  `--new` tokens, differenced, so prefill and graph capture cancel out); their ratio is
  how busy the GPU is: near 100% the step is bound by its kernels, lower by the host
  (Python between steps, the token check, graph launches);
- the kernel time per step by kind (matrix products, attention, inductor's fused kernels,
  copies, the rest), with the matrix products' weight bandwidth;
- the kernels that take the most time.

    python benchmarks/decode_profile.py --batch 1 --new 64
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.config.tools import SmokeConfig
from offline_rlhf.generation.engine import generate
from offline_rlhf.models.llama import Transformer, fuse_projections

KINDS = [  # (kind, kernel-name pattern); the first match wins
    ("matrix products", re.compile(r"gemv|gemm|cutlass|xmma|nvjet|cublas", re.I)),
    ("attention", re.compile(r"flash|fmha|cudnn|attention|sdpa", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy", re.I)),
    ("inductor fused", re.compile(r"triton", re.I)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--graphs", type=int, default=1)
    parser.add_argument("--fused", type=int, default=1, help="0: separate q/k/v and gate/up projections")
    parser.add_argument("--cudnn-attention", type=int, default=1, help="0: keep SDPA off its cuDNN backend")
    args = parser.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(bool(args.cudnn_attention))
    model = bf16_model(args.model, bool(args.fused))
    prompts = [[1 + (i * 7 + j) % 1000 for j in range(args.prompt)] for i in range(args.batch)]

    def once(new: int) -> None:
        generate(model, prompts, GenerationConfig(new, batch_size=args.batch, cuda_graphs=bool(args.graphs)),
                 None, 0, "cuda")
        torch.cuda.synchronize()

    for new in (1, args.new):
        once(new)  # compilation and the first captures
    wall, kernels, events = {}, {}, None
    for new in (1, args.new):
        start = time.perf_counter()
        once(new)
        wall[new] = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            once(new)
        events = prof.key_averages()
        kernels[new] = kernel_seconds(events)
    steps = args.new - 1
    step = (wall[args.new] - wall[1]) / steps
    per_kind = {kind: (kernels[args.new].get(kind, 0.0) - kernels[1].get(kind, 0.0)) / steps
                for kind in {*kernels[1], *kernels[args.new]}}
    busy = sum(per_kind.values())
    print(f"batch={args.batch} graphs={bool(args.graphs)} fused={bool(args.fused)} params="
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")
    print(f"wall per decode step {step * 1e3:.3f} ms; GPU kernels per step {busy * 1e3:.3f} ms "
          f"(GPU busy {100 * busy / step:.0f}% of the step)")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for kind, seconds in sorted(per_kind.items(), key=lambda item: -item[1]):
        extra = f", weights at {weights / seconds / 1e12:.2f} TB/s" if kind == "matrix products" and seconds else ""
        print(f"  {kind:16s} {seconds * 1e3:7.3f} ms per step{extra}")
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))


def bf16_model(name: str, fused: bool) -> Transformer:
    cfg = compose_stage("smoke", SmokeConfig, [f"model={name}", "seq_len=8"]).model
    with torch.device("cuda"):
        model = Transformer(cfg)
    model.init_weights()
    model = model.to(torch.bfloat16).eval()
    return fuse_projections(model) if fused else model


def kernel_seconds(events) -> dict[str, float]:
    """GPU time of one profiled run by kind of kernel (seconds)."""
    seconds: dict[str, float] = defaultdict(float)
    for event in events:
        if event.self_device_time_total > 0:
            kind = next((kind for kind, pattern in KINDS if pattern.search(event.key)), "other")
            seconds[kind] += event.self_device_time_total / 1e6
    return seconds


if __name__ == "__main__":
    main()
