"""The workload users run through `orlhf generate`: real instructions, EOS on, sampling at
temperature 1 from a model trained enough that answer lengths vary widely, n answers per
prompt. Used by `generation_throughput.py --workload realistic`.

The model: a ~4M-parameter decoder with a 2048-token BPE, both trained here (once, cached
in `--cache`) by `orlhf sft` on the public Open Assistant and self-instruct data in
../shared/data; the prompts are those datasets' instructions in the paper's template.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from offline_rlhf.checkpoint import TOKENIZER_DIR, latest_checkpoint, load_checkpoint, read_meta
from offline_rlhf.cli import main as orlhf
from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.data.prompts import read_prompts
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_prompt
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from offline_rlhf.generation.engine import Request, run
from offline_rlhf.generation.sampling import stream_id
from offline_rlhf.models.llama import Transformer
from offline_rlhf.stages.convert import empty_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
# (kind, format, path under the data folder)
SOURCES = (("sft", "self_instruct", Path("self-instruct", "data", "seed_tasks.jsonl")),
           ("sft", "oasst", Path("open-assistant", "model_eval_manual_data", "en_100_tree.jsonl")))
MODEL = ["model=tiny", "model.name=bench-4m", "model.vocab_size=2048", "model.dim=256", "model.n_layers=4",
         "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=688", "model.max_seq_len=512"]


def local_sources(data: Path) -> str:
    """The staged public files as SFT sources (the shipped default names hub datasets)."""
    sources = (f"{{name: {fmt}, format: {fmt}, path: '{data / path}'}}" for _, fmt, path in SOURCES)
    return "data.sources=[" + ", ".join(sources) + "]"


def trained_checkpoint(cache: Path, data: Path = DATA) -> Path:
    """The SFT checkpoint under `cache`, trained on first use (a few minutes on 2 cores)."""
    root = cache / "sft" / "checkpoints"
    if latest_checkpoint(root) is None:
        tokenizer = cache / "tokenizer"
        train_bpe_tokenizer([data / path for _, _, path in SOURCES], 2048, tokenizer)
        code = orlhf(["sft", f"run_dir={cache}", *MODEL, local_sources(data), f"init.tokenizer={tokenizer}",
                      "train.global_batch=16", "train.micro_batch=8", "train.epochs=12", "optim.lr=3e-3",
                      "optim.warmup_steps=20", "train.val_every=0", "logging.progress=false"])
        if code:
            raise SystemExit(f"training the benchmark model failed (exit {code})")
    return latest_checkpoint(root)


def load(checkpoint: Path, device) -> tuple[Transformer, Tokenizer]:
    model = empty_model(read_meta(checkpoint).model, "lm")
    load_checkpoint(checkpoint, model)
    return model.to(device).eval(), Tokenizer.from_dir(checkpoint / TOKENIZER_DIR)


def instructions(data: Path = DATA) -> list[str]:
    """The public instructions the model was trained on, as prompt texts."""
    return [text for kind, fmt, path in SOURCES for text in read_prompts(kind, fmt, str(data / path), ChatTemplate())]


def prompts(tokenizer: Tokenizer, count: int, max_tokens: int, data: Path = DATA) -> list[list[int]]:
    encoded = [encode_prompt(tokenizer, ChatTemplate(), text)[-max_tokens:] for text in instructions(data)]
    return (encoded * (count // len(encoded) + 1))[:count]


def ours_fn(model, encoded, cfg: GenerationConfig, tokenizer, device, lengths: list):
    requests = [Request(p, stream_id(i, j), cfg.max_new_tokens) for i, p in enumerate(encoded) for j in range(cfg.n)]

    def call():
        completions = run(model, requests, cfg, tokenizer.eos_id, tokenizer.pad_id, device)
        lengths[:] = [len(c.tokens) for c in completions]
        return sum(lengths)

    return call


def hf_fn(model, encoded, cfg: GenerationConfig, tokenizer, device, lengths: list):
    """Static batches of `batch_size` rows (batch_size / n prompts x n return sequences),
    left-padded, sampling at the same temperature; new tokens counted up to each EOS."""
    per_call = max(1, cfg.batch_size // cfg.n)

    def call():
        lengths.clear()
        for start in range(0, len(encoded), per_call):
            chunk = encoded[start:start + per_call]
            width = max(map(len, chunk))
            ids = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(ids, attention_mask=mask, do_sample=not cfg.greedy, temperature=cfg.temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.n,
                                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
            lengths.extend(_new_tokens(row, tokenizer.eos_id) for row in out[:, width:].tolist())
        return sum(lengths)

    return call


def _new_tokens(row: list[int], eos: int) -> int:
    return row.index(eos) + 1 if eos in row else len(row)


def timed(fns: dict, rounds: int) -> dict[str, tuple[float, int]]:
    """(best seconds, tokens of that call) per function, alternating within each round."""
    best = {name: (float("inf"), 0) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            tokens = fn()
            seconds = time.perf_counter() - start
            if seconds < best[name][0]:
                best[name] = (seconds, tokens)
    return best


def length_summary(lengths: list[int], limit: int) -> str:
    quantiles = statistics.quantiles(lengths, n=10)
    at_limit = sum(n >= limit for n in lengths) / len(lengths)
    return (f"answer lengths: mean {statistics.fmean(lengths):.0f}, p10 {quantiles[0]:.0f}, median "
            f"{statistics.median(lengths):.0f}, p90 {quantiles[-1]:.0f}, {at_limit:.0%} hit max_new_tokens={limit}")


def run_realistic(args, device, hf_twin) -> None:
    data = Path(args.data)
    model, tokenizer = load(trained_checkpoint(Path(args.cache), data), device)
    theirs = hf_twin(model).to(device).eval()
    encoded = prompts(tokenizer, args.prompts, max_tokens=model.cfg.max_seq_len - args.new, data=data)
    print(f"device={device} model={model.cfg.name} params={model.cfg.num_params() / 1e6:.1f}M prompts={len(encoded)} "
          f"(mean {statistics.fmean(map(len, encoded)):.0f} tokens) max_new_tokens={args.new} sampling T=1 EOS on "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    prefill = GenerationConfig(1, batch_size=max(args.batch))
    seconds = timed({"ours": ours_fn(model, encoded, prefill, tokenizer, device, []),
                     "transformers": hf_fn(theirs, encoded, prefill, tokenizer, device, [])}, args.rounds)
    prompt_tokens = sum(map(len, encoded))
    for name, (value, _) in seconds.items():
        print(f"prefill {name:>13}: {prompt_tokens / value:10.1f} prompt tokens/s (batch {prefill.batch_size})")
    for n in args.n:
        for batch in args.batch:
            cfg = GenerationConfig(args.new, greedy=False, temperature=1.0, n=n, batch_size=batch, seed=0)
            ours_lengths, hf_lengths = [], []
            seconds = timed({"ours": ours_fn(model, encoded, cfg, tokenizer, device, ours_lengths),
                             "transformers": hf_fn(theirs, encoded, cfg, tokenizer, device, hf_lengths)}, args.rounds)
            rates = {name: tokens / value for name, (value, tokens) in seconds.items()}
            for name, rate in rates.items():
                print(f"n={n} slots={batch:3d} {name:>13}: {rate:10.1f} new tokens/s ({seconds[name][0]:.2f} s)")
            print(f"n={n} slots={batch:3d} ratio ours/transformers: {rates['ours'] / rates['transformers']:.2f}; "
                  f"ours {length_summary(ours_lengths, args.new)}; transformers {length_summary(hf_lengths, args.new)}")
