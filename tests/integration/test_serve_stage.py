"""`orlhf serve` as a real server process on 127.0.0.1: the `openai` client talks to it, its
greedy answers are `orlhf eval`'s for the same prompts (a DT model behind the reward prompt
its checkpoint names; streamed, the same in pieces), it needs its API key, refuses bad
requests and goes on, and SIGTERM ends it cleanly with its ledger row."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.cli import main
from offline_rlhf.ledger import read_ledger
from tests.fixtures import REPO_ROOT, reference_model
from tests.synthetic_preferences import MODEL
from tests.unit.serving.tiny import make_tokenizer, write_lm_checkpoint, write_rm_checkpoint

pytestmark = pytest.mark.slow

KEY_ENV = "ORLHF_SERVE_TEST_KEY"
KEY = "integration-key-1234"
PROMPTS = ["Say something about apple.", "Tell me about the river and the stone.", "good music"]
DT_TARGET = 3.5
JUDGE_PROMPTS = REPO_ROOT.parent / "shared" / "data" / "fastchat" / "llm_judge" / "data" / "judge_prompts.jsonl"
MAX_NEW = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_run")
    tokenizer = make_tokenizer(root / "tokenizer")
    sft = write_lm_checkpoint(root / "sft" / "checkpoints", tokenizer)
    dt = write_lm_checkpoint(root / "align_dt" / "checkpoints", tokenizer, seed=5,
                             metadata={"alignment": {"method": "dt", "dt_target": DT_TARGET}})
    return root, sft, dt, write_rm_checkpoint(root / "rm" / "checkpoints", tokenizer)


class ServeProcess:
    """`python -m offline_rlhf.cli serve ...` (under torchrun for nproc > 1), up once its
    address.json names the URL."""

    def __init__(self, run_dir: Path, *args: str, nproc: int = 1, env: dict | None = None, timeout_s: float = 180):
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
        self.address = run_dir / "serve" / "address.json"
        self.process = subprocess.Popen(
            [sys.executable, *launcher, "-m", "offline_rlhf.cli", "serve", f"run_dir={run_dir}", "port=0", *args],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        deadline = time.monotonic() + timeout_s
        while not self.address.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"orlhf serve did not start:\n{self.process.communicate()[0][-4000:]}")
            time.sleep(0.1)
        address = json.loads(self.address.read_text())
        self.url, self.pid = address["url"], address["pid"]
        assert address["base_url"] == f"{self.url}/v1"  # what an OpenAI client takes

    def stop(self) -> tuple[int, str]:
        """SIGTERM to the serving process (rank 0: under torchrun it releases the other
        ranks, and torchrun exits 0), then the exit code and the output."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            output = self.process.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            self.process.kill()
            output = self.process.communicate()[0]
        return self.process.returncode, output


def chat_answers(url: str, model: str, api_key: str = "unused", stream: bool = False) -> list[str]:
    """The greedy chat answer to each prompt; `stream`: read as a streamed answer's pieces."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120) as client:
        asks = [dict(model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=MAX_NEW)
                for prompt in PROMPTS]
        if not stream:
            return [client.chat.completions.create(**ask).choices[0].message.content for ask in asks]
        return [streamed_text(client.chat.completions.create(**ask, stream=True)) for ask in asks]


def streamed_text(chunks) -> str:
    """One choice's streamed pieces, joined."""
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks)


def eval_answers(sft: Path, dt: Path, rm: Path, tmp_path: Path) -> dict[str, list[str]]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    models = (f"models=[{{name: sft, checkpoint: '{sft}'}}, "
              f"{{name: dt, checkpoint: '{dt}', reward_prompt: {DT_TARGET}}}]")
    assert main(["eval", f"run_dir={tmp_path / 'eval_run'}", f"prompts={prompts}", "prompt_key=prompt", models,
                 f"rm={rm}", f"generation.max_new_tokens={MAX_NEW}", "generation.batch_size=2"]) == 0
    return {name: [json.loads(line)["response"] for line in
                   (tmp_path / "eval_run" / "eval" / f"answers_{name}.jsonl").read_text().splitlines()]
            for name in ("sft", "dt")}


def test_served_greedy_answers_are_orlhf_evals_and_sigterm_ends_the_server(checkpoints, tmp_path):
    _, sft, dt, rm = checkpoints
    expected = eval_answers(sft, dt, rm, tmp_path)
    run_dir = tmp_path / "serve_run"
    server = ServeProcess(run_dir, f"ckpt={sft}", f"api_key_env={KEY_ENV}", env={KEY_ENV: KEY})
    try:
        assert chat_answers(server.url, "sft", KEY) == expected["sft"]  # named after its stage folder
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        bad = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=30,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        assert chat_answers(server.url, "sft", KEY) == expected["sft"]  # and it goes on serving
        assert chat_answers(server.url, "sft", KEY, stream=True) == expected["sft"]
    finally:
        code, output = server.stop()
    assert code == 0, output[-4000:]
    assert KEY not in output and KEY not in (run_dir / "serve" / "config.yaml").read_text()
    assert not server.address.exists()
    [row] = read_ledger(run_dir)
    assert row.stage == "serve" and row.status == "completed" and row.tokens > 0

    dt_server = ServeProcess(tmp_path / "dt_run", f"ckpt={dt}", "model_name=dt")  # reward prompt from metadata
    try:
        assert chat_answers(dt_server.url, "dt") == expected["dt"]
        assert chat_answers(dt_server.url, "dt", stream=True) == expected["dt"]  # behind the same reward prompt
        assert chat_answers(dt_server.url, "dt") != chat_answers_without_prompt(tmp_path, dt)
    finally:
        assert dt_server.stop()[0] == 0


def chat_answers_without_prompt(tmp_path: Path, dt: Path) -> list[str]:
    """The DT model prompted at another score gives other answers (so the prompt mattered)."""
    other = ServeProcess(tmp_path / "dt_other_run", f"ckpt={dt}", "model_name=dt", "reward_prompt=-2.0")
    try:
        return chat_answers(other.url, "dt")
    finally:
        other.stop()


def test_an_unset_api_key_variable_is_a_one_line_error(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ORLHF_SERVE_UNSET_KEY", raising=False)
    _, sft, _, _ = checkpoints
    assert main(["serve", f"run_dir={tmp_path}", f"ckpt={sft}", "api_key_env=ORLHF_SERVE_UNSET_KEY"]) == 2
    err = capsys.readouterr().err
    assert "api_key_env: the environment variable ORLHF_SERVE_UNSET_KEY is unset or empty" in err
    assert main(["serve", f"ckpt={sft}", "api_key_env=sk-123 abc"]) == 2
    assert "is not an environment variable name" in capsys.readouterr().err


def test_a_taken_port_or_a_foreign_address_is_a_one_line_error(checkpoints, tmp_path, capsys, monkeypatch):
    _, sft, _, _ = checkpoints
    monkeypatch.setenv(KEY_ENV, KEY)  # a host other than loopback needs a key
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", f"run_dir={tmp_path / 'a'}", f"ckpt={sft}", f"port={port}"]) == 2
    assert f"port: cannot listen on 127.0.0.1:{port} (Address already in use" in capsys.readouterr().err
    assert main(["serve", f"run_dir={tmp_path / 'b'}", f"ckpt={sft}", "host=192.0.2.1", "port=0",
                 f"api_key_env={KEY_ENV}"]) == 2
    assert "cannot listen on 192.0.2.1:0" in capsys.readouterr().err


def test_orlhf_judge_grades_through_orlhf_serve(checkpoints, tmp_path):
    """The whole evaluation path with nothing scripted: `orlhf judge` (FastChat's single
    grading prompts) against `orlhf serve` with a tiny random model as the judge. Its
    replies carry no [[rating]], so every judgment is a counted parse failure, never a crash."""
    root, _, _, _ = checkpoints
    judge_ckpt = root / "judge_model" / "checkpoints"
    if not judge_ckpt.exists():  # long enough for FastChat's prompts (the served model refuses longer ones)
        save_checkpoint(judge_ckpt, reference_model(replace(MODEL, max_seq_len=2048), "lm", seed=7),
                        CheckpointMeta(replace(MODEL, max_seq_len=2048), "lm", TrainState(step=1)),
                        tokenizer_dir=root / "tokenizer")
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": "writing", "turns": [p]}) + "\n"
                                 for i, p in enumerate(PROMPTS, 1)))
    answers = tmp_path / "answers_tiny.jsonl"
    answers.write_text("".join(json.dumps({"prompt": p, "response": "an answer", "finished": True}) + "\n"
                               for p in PROMPTS))
    server = ServeProcess(tmp_path / "judge_serve", f"ckpt={judge_ckpt}", "model_name=judge")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "offline_rlhf.cli", "judge", f"run_dir={tmp_path / 'judged'}",
             f"questions={questions}", f"answers=[{{model: tiny, path: '{answers}'}}]",
             f"judge_prompts={JUDGE_PROMPTS}", "baseline=tiny", f"judge.base_url={server.url}/v1", "judge.model=judge",
             "judge.max_tokens=16", "judge.concurrency=2"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    judged = [json.loads(line) for line in (tmp_path / "judged" / "judge" / "judgments_single.jsonl").read_text()
              .splitlines()]
    assert sorted(r["question_id"] for r in judged) == [1, 2, 3]
    assert all(r["judge"] == ["judge", "single-v1"] and r["judgment"] and r["score"] == -1 for r in judged)
    results = json.loads((tmp_path / "judged" / "judge" / "results.json").read_text())
    assert results["summary"]["parse_failures"] == 3 and results["sent"] == 3
