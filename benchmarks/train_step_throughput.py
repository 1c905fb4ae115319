"""Training-step throughput (forward, backward, AdamW) of our model against
`transformers`' LlamaForCausalLM with the same config and weights, measured in one run.

    python benchmarks/train_step_throughput.py                 # CPU default: a ~20M model
    python benchmarks/train_step_throughput.py --model 1b --seq 4096 --batch 1   # on a GPU

Prints tokens/s for each, the ratio ours / transformers, and on CUDA TFLOP/s and MFU
from the analytic FLOPs count in offline_rlhf.metrics. Ours computes its loss as the
stages do (`model_token_nll`: the LM head's logits a chunk of tokens at a time, each
chunk's recomputed in the backward), transformers' from its whole logits.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.schema import ModelConfig
from offline_rlhf.config.tools import SmokeConfig
from offline_rlhf.metrics import mfu, training_flops_per_token
from offline_rlhf.models.hf import config_to_hf, hf_state_dict
from offline_rlhf.models.llama import Transformer
from offline_rlhf.parallel.logprobs import model_token_nll

CPU_DEFAULT = ModelConfig(name="bench-20m", vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=4,
                          ffn_dim=1376, max_seq_len=1024)


def hf_twin(model: Transformer):
    """The same config and weights in transformers' Llama, with its SDPA attention."""
    import transformers

    hf_config = transformers.LlamaConfig(**config_to_hf(model.cfg), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_config)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model, "float32"), strict=False)
    tied = {"lm_head.weight"} if model.cfg.tie_embeddings else set()  # the embedding, shared again below
    assert not unexpected and all("rotary" in k or k in tied for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf


def step_fn(model, tokens, is_hf: bool, autocast_dtype):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=tokens.is_cuda)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if is_hf:
                logits = model(tokens).logits[:, :-1]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            else:  # what the stages run: logits a chunk at a time (`head_token_nll`)
                loss = model_token_nll(model, {"tokens": tokens, "positions": None, "labels": tokens})[0].mean()
        loss.backward()
        optimizer.step()
    return step


def time_steps(step, steps: int, device: torch.device) -> float:
    step()  # warm-up: allocator, optimizer state, kernels
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a conf/model name (default: a ~20M CPU model)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternate the two models this many times")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CPU_DEFAULT if args.model is None else compose_stage("smoke", SmokeConfig,
                                                               [f"model={args.model}", "seq_len=8"]).model
    autocast = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)
    ours.init_weights()
    theirs = hf_twin(ours).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    steps = {"ours": step_fn(ours, tokens, False, autocast), "transformers": step_fn(theirs, tokens, True, autocast)}
    best = {name: min(time_steps(fn, args.steps, device) for _ in range(args.rounds)) for name, fn in steps.items()}

    tokens_per_step = args.batch * args.seq
    print(f"device={device} model={cfg.name} params={cfg.num_params() / 1e6:.1f}M seq={args.seq} batch={args.batch} "
          f"dtype={'bf16 autocast' if autocast else 'fp32'} torch={torch.__version__}")
    for name, seconds in best.items():
        tps = tokens_per_step / seconds
        line = f"{name:>13}: {tps:10.1f} tokens/s  ({seconds * 1e3:.1f} ms/step)"
        if device.type == "cuda":
            line += f"  {tps * training_flops_per_token(cfg, args.seq) / 1e12:.1f} TFLOP/s"
            utilization = mfu(tps, cfg, args.seq, device)
            line += f"  MFU {utilization:.1%}" if utilization is not None else ""
        print(line)
    print(f"ratio ours/transformers: {best['transformers'] / best['ours']:.3f}")


if __name__ == "__main__":
    main()
