"""Generation throughput (new tokens/s) of our continuous-batching engine against
`transformers`' `generate`, on the same weights and prompts, measured in one run.

    python benchmarks/generation_throughput.py                       # synthetic: a ~20M model,
                                                                     # greedy, EOS disabled
    python benchmarks/generation_throughput.py --workload realistic  # real prompts, EOS on, T=1,
                                                                     # n=1 and 4, 32 and 128 slots
    python benchmarks/generation_throughput.py --model 1b --new 256  # on a GPU (bf16)
    python benchmarks/generation_throughput.py --model 1b --new 256 --batch 1 --roofline-only \
        --fused 0 --attention flex --compile-mode coordinate-descent   # one variant of our step

The synthetic workload makes every row equally long (batch x max_new_tokens tokens); the
realistic one (benchmarks/realistic_generation.py) is what `orlhf generate` runs, where
answers end at different lengths and a static batcher decodes padding.

Prints tokens/s for each at every batch size and the ratio ours / transformers; on CUDA
also our decode-step bandwidth (weight + KV-cache bytes read per step / step time) as a
fraction of the device's peak memory bandwidth.
"""

from __future__ import annotations

import argparse
import time

import torch
from realistic_generation import DATA, REPO, run_realistic
from train_step_throughput import CPU_DEFAULT, hf_twin

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.schema import COMPILE_MODES, DECODE_ATTENTION, GenerationConfig, ModelConfig
from offline_rlhf.config.tools import SmokeConfig
from offline_rlhf.generation.engine import generate
from offline_rlhf.models.llama import Transformer, fuse_projections

PAD = 0
# Peak HBM bandwidth by device-name fragment (first match wins), bytes/s.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
                  "A100": 1.555e12, "L40S": 0.864e12}


def random_prompts(batch: int, min_len: int, max_len: int, vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=gen).tolist()
    return [torch.randint(1, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def ours_fn(model, prompts, new_tokens: int, device, **settings):
    """settings: GenerationConfig fields (cuda_graphs, compile, compile_mode, decode_attention)."""
    cfg = GenerationConfig(new_tokens, batch_size=len(prompts), **settings)
    return lambda: generate(model, prompts, cfg, None, PAD, device)


def hf_fn(model, prompts, new_tokens: int, device):
    """Left-padded batch with an attention mask: transformers derives positions from it."""
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return lambda: model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=PAD)


def best_seconds(fns: dict, rounds: int, device) -> dict[str, float]:
    """Fastest of `rounds` timings of each function. The functions alternate within each
    round, so load from elsewhere on the machine hits them alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_bandwidth(model: Transformer, prompts, new_tokens: int, rounds: int, device,
                     settings: dict) -> tuple[float, float, float]:
    """(bytes/s, seconds) of one decode step and the prefill's prompt tokens/s: the step
    time is (t(new) - t(1)) / (new - 1), which removes the prefill. Bytes: every weight
    once (the embedding table is only gathered from, so it counts unless tied to the
    output), plus the KV cache at the mean length over the decode steps."""
    seconds = best_seconds({"full": ours_fn(model, prompts, new_tokens, device, **settings),
                            "prefill": ours_fn(model, prompts, 1, device, **settings)}, rounds, device)
    step = (seconds["full"] - seconds["prefill"]) / (new_tokens - 1)
    cfg, itemsize = model.cfg, next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    mean_len = max(map(len, prompts)) + new_tokens / 2
    kv = 2 * cfg.n_layers * len(prompts) * cfg.kv_heads * cfg.resolved_head_dim * mean_len
    return (weights + kv) * itemsize / step, step, sum(map(len, prompts)) / seconds["prefill"]


def copy_bandwidth(device, gigabytes: float = 2.0, repeats: int = 10) -> float:
    """The device's measured memory roofline: bytes read + written per second by a large
    device-to-device copy (what a memory-bound kernel can hope for)."""
    source = torch.empty(int(gigabytes * 2**30), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    _sync(device)
    return 2 * source.numel() * repeats / (time.perf_counter() - start)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a conf/model name (default: a ~20M CPU model)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"),
                        help="prompt lengths are drawn uniformly from this range")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--workload", choices=("synthetic", "realistic"), default="synthetic")
    parser.add_argument("--compile", type=int, default=1, help="CUDA: 0 leaves the decode step uncompiled")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="synthetic: generation.compile_mode of our engine")
    parser.add_argument("--attention", choices=DECODE_ATTENTION, default="sdpa",
                        help="synthetic: generation.decode_attention of our engine")
    parser.add_argument("--fused", type=int, default=1,
                        help="synthetic: our model with fused q/k/v and gate/up projections, as generate/eval/"
                             "serve load it (0: separate)")
    parser.add_argument("--roofline-only", action="store_true", help="CUDA: only our decode step against the roofline")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4], help="realistic: answers per prompt")
    parser.add_argument("--prompts", type=int, default=256, help="realistic: prompts per measurement")
    parser.add_argument("--cache", default=str(REPO / "runs" / "bench_generation"),
                        help="realistic: where the trained model lives")
    parser.add_argument("--data", default=str(DATA), help="realistic: the public data folder (../shared/data)")
    return parser.parse_args()


def build_models(args: argparse.Namespace, device) -> tuple[ModelConfig, Transformer, torch.nn.Module, torch.dtype]:
    """Our model (`--model`, else a ~20M CPU model; seeded random weights, fused with
    `--fused`) and its transformers twin with the same weights, on `device` in bf16 on CUDA
    (else float32), in eval mode: (config, ours, theirs, dtype)."""
    cfg: ModelConfig = CPU_DEFAULT if args.model is None else compose_stage(
        "smoke", SmokeConfig, [f"model={args.model}", "seq_len=8"]).model
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    ours = Transformer(cfg)
    ours.init_weights()
    theirs = hf_twin(ours).to(device, dtype).eval()
    ours = ours.to(device, dtype).eval()
    if args.fused:
        fuse_projections(ours)
    return cfg, ours, theirs, dtype


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.workload == "realistic":
        run_realistic(args, device, hf_twin)
        return
    cfg, ours, theirs, dtype = build_models(args, device)
    settings = {"compile": bool(args.compile), "compile_mode": args.compile_mode, "decode_attention": args.attention}

    print(f"device={device} model={cfg.name} params={cfg.num_params() / 1e6:.1f}M dtype={dtype} "
          f"prompt_len={args.prompt[0]}-{args.prompt[1]} new_tokens={args.new} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} fused={bool(args.fused)} {settings}")
    for batch in args.batch:
        prompts = random_prompts(batch, *args.prompt, cfg.vocab_size)
        if args.roofline_only:
            print_roofline(ours, prompts, args, device, settings)
            continue
        fns = {"ours": ours_fn(ours, prompts, args.new, device, **settings),
               "transformers": hf_fn(theirs, prompts, args.new, device)}
        if device.type == "cuda":  # what CUDA graphs and compilation each bring
            fns["ours, no graphs"] = ours_fn(ours, prompts, args.new, device, cuda_graphs=False)
            if args.compile:
                fns["ours, not compiled"] = ours_fn(ours, prompts, args.new, device, compile=False)
        seconds = best_seconds(fns, args.rounds, device)
        for name, value in seconds.items():
            print(f"batch={batch:3d} {name:>13}: {batch * args.new / value:10.1f} new tokens/s  ({value:.3f} s)")
        print(f"batch={batch:3d} ratio ours/transformers: {seconds['transformers'] / seconds['ours']:.3f}")
        if device.type == "cuda":
            print_roofline(ours, prompts, args, device, settings)


def print_roofline(model, prompts, args, device, settings: dict) -> None:
    bandwidth, step, prefill = decode_bandwidth(model, prompts, args.new, args.rounds, device, settings)
    name = torch.cuda.get_device_name(device)
    measured = copy_bandwidth(device)
    peak = next((value for key, value in PEAK_BANDWIDTH.items() if key in name), None)
    line = (f"batch={len(prompts):3d} prefill {prefill:.0f} prompt tokens/s; decode step {step * 1e3:.3f} ms, "
            f"{bandwidth / 1e12:.2f} TB/s = {bandwidth / measured:.1%} of the measured copy roofline "
            f"{measured / 1e12:.2f} TB/s")
    suffix = f", {bandwidth / peak:.1%} of {name}'s datasheet {peak / 1e12:.2f} TB/s" if peak else f" ({name})"
    print(line + suffix)


if __name__ == "__main__":
    main()
