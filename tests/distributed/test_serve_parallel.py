"""`orlhf serve` as a two-process gloo world under torchrun (parallel.tp=2: rank 0 serves
HTTP and broadcasts every batch, both ranks decode it) gives the greedy answers the
one-process engine gives, for requests alone and sharing batches, streamed or not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from offline_rlhf.checkpoint import resolve_checkpoint
from offline_rlhf.config.schema import GenerationConfig, ParallelConfig
from offline_rlhf.config.serving import ServeConfig
from offline_rlhf.data.tokenize import encode_prompt
from offline_rlhf.generation.engine import Request, answer_text, run
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.serving.model import load_served_model
from tests.fixtures import REPO_ROOT, runtime_for
from tests.integration.test_serve_stage import ServeProcess
from tests.synthetic_preferences import MODEL
from tests.unit.serving.tiny import make_tokenizer, write_lm_checkpoint

pytestmark = pytest.mark.slow

PROMPTS = ["Say something about apple.", "river stone", "good music and green light", "table"]
MAX_NEW = 10


def one_process_answers(ckpt, stage_dir) -> list[str]:
    """The TP=1 reference: the engine on the same checkpoint in this process."""
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None, stage_dir)
    served = load_served_model(ServeConfig(ckpt=str(ckpt)), resolve_checkpoint(ckpt), rt)
    tokenizer = served.tokenizer
    requests = [Request(encode_prompt(tokenizer, served.template, p), 0, MAX_NEW) for p in PROMPTS]
    completions = run(served.model, requests, GenerationConfig(max_new_tokens=MAX_NEW), tokenizer.eos_id,
                      tokenizer.pad_id, "cpu")
    return [answer_text(c, tokenizer.decode, []) for c in completions]


def test_a_tensor_parallel_server_answers_what_one_process_answers(tmp_path):
    ckpt = write_lm_checkpoint(tmp_path / "sft" / "checkpoints", make_tokenizer(tmp_path / "tokenizer"))
    expected = one_process_answers(ckpt, tmp_path / "reference")
    server = ServeProcess(tmp_path / "run", f"ckpt={ckpt}", "parallel.tp=2", "model_name=tiny", nproc=2)
    try:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            def ask(prompt, **sampling):
                answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                        max_tokens=MAX_NEW, **sampling)
                return [choice.message.content for choice in answer.choices]

            def ask_streamed(prompt, **sampling):
                texts = {}
                for chunk in client.chat.completions.create(model="tiny", max_tokens=MAX_NEW, stream=True,
                                                            messages=[{"role": "user", "content": prompt}], **sampling):
                    for choice in chunk.choices:  # only rank 0 streams; rank 1 decodes the same batch
                        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
                return [texts[index] for index in sorted(texts)]

            assert [ask(p, temperature=0)[0] for p in PROMPTS] == expected  # one at a time
            together = [None] * len(PROMPTS)
            threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(PROMPTS[i], temperature=0)[0]))
                       for i in range(len(PROMPTS))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert together == expected  # concurrently, sharing batches
            sampled = ask(PROMPTS[0], temperature=1.0, n=2, seed=11)
            assert ask(PROMPTS[0], temperature=1.0, n=2, seed=11) == sampled and len(set(sampled)) == 2
            assert [ask_streamed(p, temperature=0)[0] for p in PROMPTS] == expected
            assert ask_streamed(PROMPTS[0], temperature=1.0, n=2, seed=11) == sampled
            joined = ask(PROMPTS[1], temperature=1.0, seed=5)
            assert join_then_leave(server.url, lambda: ask(PROMPTS[1], temperature=1.0, seed=5)) == joined
            assert [ask(p, temperature=0)[0] for p in PROMPTS] == expected  # both ranks changed the batch alike
    finally:
        code, output = server.stop()
    assert code == 0, output[-4000:]
    assert "2-way tensor parallel" in output
    assert "serve: 1 request(s) given up in the running batch: their client left" in output


def join_then_leave(url: str, ask):
    """A long sampled answer streams; once its first event came (its batch runs), `ask`'s
    request of the same rule joins that batch at a poll (rank 0 tells rank 1, both add
    it), then the stream's client leaves (both ranks end its row at a poll). Returns
    `ask`'s answer."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[3]}], "max_tokens": 48,
            "temperature": 1.0, "seed": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        next(response.iter_lines())
        answer = ask()
    return answer


def test_a_world_whose_rank_0_cannot_listen_ends_at_once(tmp_path):
    """Rank 0 fails before serving: it still releases the other rank, so the world ends
    with its one-line error instead of hanging in a broadcast."""
    ckpt = write_lm_checkpoint(tmp_path / "sft" / "checkpoints", make_tokenizer(tmp_path / "tokenizer"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
             "offline_rlhf.cli", "serve", f"run_dir={tmp_path / 'run'}", f"ckpt={ckpt}", "parallel.tp=2",
             f"port={taken.getsockname()[1]}"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "orlhf serve: error: port: cannot listen on 127.0.0.1" in result.stderr
