"""Where a decode step's time goes: our engine on a ~1B model in bf16, one batch, under
torch.profiler; prints the wall time per step, the GPU kernel time per step and the
kernels that take it (CUDA only).

    python benchmarks/decode_profile.py --batch 1 --new 64
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.config.tools import SmokeConfig
from offline_rlhf.generation.engine import generate
from offline_rlhf.models.llama import Transformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--graphs", type=int, default=1)
    parser.add_argument("--cudnn-attention", type=int, default=1, help="0: keep SDPA off its cuDNN backend")
    args = parser.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(bool(args.cudnn_attention))
    cfg = compose_stage("smoke", SmokeConfig, [f"model={args.model}", "seq_len=8"]).model
    with torch.device("cuda"):
        model = Transformer(cfg)
    model.init_weights()
    model = model.to(torch.bfloat16).eval()
    prompts = [[1 + (i * 7 + j) % 1000 for j in range(args.prompt)] for i in range(args.batch)]
    gen_cfg = GenerationConfig(args.new, batch_size=args.batch, cuda_graphs=bool(args.graphs))

    def once(new):
        generate(model, prompts, GenerationConfig(new, batch_size=args.batch, cuda_graphs=bool(args.graphs)),
                 None, 0, "cuda")
        torch.cuda.synchronize()

    for new in (1, args.new):
        once(new)  # warm-up
    seconds = {}
    for new in (1, args.new):
        start = time.perf_counter()
        once(new)
        seconds[new] = time.perf_counter() - start
    step = (seconds[args.new] - seconds[1]) / (args.new - 1)
    print(f"batch={args.batch} graphs={bool(args.graphs)} wall per decode step {step * 1e3:.3f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(model, prompts, gen_cfg, None, 0, "cuda")
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1e3
    print(f"GPU kernel time per step (incl. prefill share) {gpu_total / args.new:.3f} ms")
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
