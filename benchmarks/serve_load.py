"""`orlhf serve` under load: a real server process on 127.0.0.1 answering closed-loop
clients (each sends its next chat request when its last one was answered), with requests
joining the running batch (the default) against `join_running=false` (a request waits for
the running batch to end), the two alternating in one run.

    python benchmarks/serve_load.py                            # 16 clients, 96 requests, 16 slots
    python benchmarks/serve_load.py --clients 32 --slots 32 --requests 192

The model and prompts are the realistic generation workload's (realistic_generation.py): a
small model trained on public instructions, so answer lengths vary widely, sampled at
temperature 1, each request with its own seed. Prints per mode the completion tokens/s,
requests/s, latency p50 / p90 and the server's engine batches, then the ratio joining /
waiting (best round of each).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from realistic_generation import DATA, REPO, instructions, trained_checkpoint

from offline_rlhf.checkpoint import TOKENIZER_DIR
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_prompt
from offline_rlhf.data.tokenizer import Tokenizer

MODES = {"joining": "true", "waiting": "false"}
CONTEXT = 512  # the realistic model's max_seq_len


class Server:
    """`orlhf serve` in a process of its own, up once its address.json exists."""

    def __init__(self, checkpoint: Path, run_dir: Path, args, join_running: str):
        self.run_dir = run_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "offline_rlhf.cli", "serve", f"run_dir={run_dir}", f"ckpt={checkpoint}", "port=0",
             "model_name=bench", f"batch_size={args.slots}", f"max_tokens={args.new}", f"join_running={join_running}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        address = run_dir / "serve" / "address.json"
        deadline = time.monotonic() + 120
        while not address.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"orlhf serve did not start:\n{self.process.communicate()[0][-3000:]}")
            time.sleep(0.1)
        self.url = json.loads(address.read_text())["url"]

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        return self.process.communicate(timeout=60)[0]


def load(url: str, texts: list[str], clients: int, new: int) -> tuple[float, list[float], int]:
    """Every text asked once by `clients` closed-loop clients: (seconds, latencies, completion tokens)."""
    queue, latencies, tokens, lock = list(enumerate(texts)), [], [0], threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    index, text = queue.pop(0)
                body = {"model": "bench", "messages": [{"role": "user", "content": text}], "temperature": 1.0,
                        "seed": index, "max_tokens": new}
                start = time.perf_counter()
                answer = http.post(f"{url}/v1/chat/completions", json=body)
                answer.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens[0] += answer.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies, tokens[0]


def fitting_texts(checkpoint: Path, count: int, new: int, data: Path) -> list[str]:
    """`count` instructions whose chat prompt leaves room for `new` tokens in the context."""
    tokenizer = Tokenizer.from_dir(checkpoint / TOKENIZER_DIR)
    texts = [t for t in instructions(data) if len(encode_prompt(tokenizer, ChatTemplate(), t)) + new <= CONTEXT]
    return (texts * (count // len(texts) + 1))[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--slots", type=int, default=16, help="the server's batch_size (decode slots)")
    parser.add_argument("--new", type=int, default=128, help="max_tokens of every request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", default=str(REPO / "runs" / "bench_generation"),
                        help="where the realistic workload's model is trained once and kept")
    parser.add_argument("--data", default=str(DATA), help="the public data folder (../shared/data)")
    args = parser.parse_args()
    checkpoint = trained_checkpoint(Path(args.cache), Path(args.data))
    texts = fitting_texts(checkpoint, args.requests, args.new, Path(args.data))
    print(f"clients={args.clients} requests={len(texts)} slots={args.slots} max_tokens={args.new} sampling T=1")
    best: dict[str, tuple[float, list[float], int]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for mode, join_running in MODES.items():
                server = Server(checkpoint, Path(scratch) / f"{mode}{round_}", args, join_running)
                try:
                    seconds, latencies, tokens = load(server.url, texts, args.clients, args.new)
                finally:
                    output = server.stop()
                batches = re.search(r"in (\d+) engine batches", output).group(1)
                print(f"round {round_} {mode:>8}: {tokens / seconds:8.1f} tokens/s {len(texts) / seconds:6.2f} "
                      f"requests/s latency p50 {statistics.median(latencies):.2f} s p90 "
                      f"{statistics.quantiles(latencies, n=10)[-1]:.2f} s ({seconds:.1f} s, {batches} engine batches)")
                if mode not in best or tokens / seconds > best[mode][2] / best[mode][0]:
                    best[mode] = (seconds, latencies, tokens)
    rates = {mode: tokens / seconds for mode, (seconds, _, tokens) in best.items()}
    print(f"ratio joining/waiting: {rates['joining'] / rates['waiting']:.2f}x tokens/s (best round of each)")


if __name__ == "__main__":
    main()
