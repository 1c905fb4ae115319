"""`orlhf judge` end to end, as a user runs it (a subprocess of the CLI, which must not load
torch), against a real HTTP server on 127.0.0.1 that returns scripted replies: single,
pairwise and paper formats, parsing, retries on 429 and 500, a timeout, a resume that sends
only the missing judgments, and an API key sent as a Bearer token and written nowhere."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
JUDGE_PROMPTS = REPO.parent / "shared" / "data" / "fastchat" / "llm_judge" / "data" / "judge_prompts.jsonl"
KEY = "s3cret-judge-key-0123456789"
# Runs the CLI and fails with 99 if anything imported torch.
CLI = ("import sys\nfrom offline_rlhf.cli import main\nrc = main(sys.argv[1:])\n"
       "sys.exit(99 if 'torch' in sys.modules else rc)")


class Judge:
    """What the scripted server does: `actions` are used up one per request (429, 500,
    "slow": answer after 1.5 s), after `fail_after` good replies every request gets 500,
    otherwise `reply(user_prompt)` is the judgment."""

    def __init__(self, reply, actions=(), fail_after=None):
        self.reply, self.actions, self.fail_after = reply, list(actions), fail_after
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.served = 0

    def next_action(self, request: dict):
        with self.lock:
            self.requests.append(request)
            if self.actions:
                return self.actions.pop(0)
            if self.fail_after is not None and self.served >= self.fail_after:
                return 500
            self.served += 1
            return None


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        judge: Judge = self.server.judge
        action = judge.next_action({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if action in (429, 500):
            self._send(action, {"error": {"message": "scripted"}}, {"Retry-After": "0"} if action == 429 else {})
            return
        if action == "slow":
            time.sleep(1.5)
        content = judge.reply(body["messages"][-1]["content"])
        if isinstance(content, tuple):  # (status, OpenAI error object): a refusal of this request
            self._send(content[0], {"error": content[1]})
            return
        finish = "stop" if content is not None else "length"  # null content: a reasoning model cut off
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": finish}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": 20}})

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = {}

    def start(judge: Judge, url: str | None = None) -> str:
        """A new server, or (`url`) the one at url now answering as `judge`: the same endpoint."""
        if url:
            servers[url].judge = judge
            return url
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.judge = judge
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        servers[url] = server
        return url

    yield start
    for server in servers.values():
        server.shutdown()
        server.server_close()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def inputs(tmp_path):
    return write_inputs(tmp_path)


def write_inputs(tmp_path: Path) -> dict:
    """Three questions (one math, graded against a reference; one with two turns); `good`
    answers in FastChat's format, `bad` in `orlhf eval`'s (one turn only)."""
    questions = [{"question_id": 1, "category": "writing", "turns": ["Describe the sea."]},
                 {"question_id": 2, "category": "math", "turns": ["What is 2 + 2?"]},
                 {"question_id": 3, "category": "stem", "turns": ["Name a planet.", "And a moon of it?"]}]
    good = [{"question_id": q["question_id"], "model_id": "good",
             "choices": [{"index": 0, "turns": [f"GOOD answer {q['question_id']}.{t}" for t in (1, 2)]}]}
            for q in questions]
    bad = [{"prompt": q["turns"][0], "response": "UNREADABLE" if q["question_id"] == 1 else f"BAD answer {i}",
            "finished": True} for i, q in enumerate(questions)]
    reference = [{"question_id": 2, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["REFERENCE: 4"]}]}]
    return {"questions": write_jsonl(tmp_path / "question.jsonl", questions),
            "good": write_jsonl(tmp_path / "good.jsonl", good), "bad": write_jsonl(tmp_path / "answers_bad.jsonl", bad),
            "reference": write_jsonl(tmp_path / "reference.jsonl", reference), "run_dir": tmp_path / "run"}


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def run_judge(inputs, base_url, *overrides, key=KEY, answers=None, env=None):
    """The CLI, with this machine's proxy variables replaced by `env`'s (the client honours them)."""
    answers = answers or {"good": inputs["good"], "bad": inputs["bad"]}
    args = ["judge", f"run_dir={inputs['run_dir']}", f"questions={inputs['questions']}",
            "answers=[" + ", ".join(f"{{model: {m}, path: '{p}'}}" for m, p in answers.items()) + "]",
            f"reference_answers={inputs['reference']}", f"judge_prompts={JUDGE_PROMPTS}", "baseline=bad",
            f"judge.base_url={base_url}", "judge.model=judge-x", "judge.api_key_env=JUDGE_TEST_KEY",
            "judge.backoff_s=0.01", "judge.timeout_s=0.5", *overrides]
    clean = {k: v for k, v in os.environ.items() if k.upper() not in PROXY_VARIABLES}
    env = {**clean, "JUDGE_TEST_KEY": key, **(env or {})}
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def grade(prompt: str) -> str:
    """A judge that rates GOOD answers 8 and BAD ones 3, and cannot read UNREADABLE ones."""
    answer = prompt.split("[The Start of Assistant's Answer]\n")[-1] if "[The Start" in prompt else prompt
    if "UNREADABLE" in answer:
        return "I cannot decide on this one."
    return "Solid.\n\nRating: [[8]]" if "GOOD" in answer else "Weak. Rating: [3]"


def records(inputs, fmt):
    path = inputs["run_dir"] / "judge" / f"judgments_{fmt}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_single_grading_with_retries_timeouts_and_a_secret_key(inputs, serve):
    judge = Judge(grade, actions=[429, 500, "slow"])
    done = run_judge(inputs, serve(judge), "judge.concurrency=2", "judge.max_retries=3")
    assert done.returncode == 0, done.stderr
    out = inputs["run_dir"] / "judge"
    got = {(r["question_id"], r["model"], r["turn"]): r for r in records(inputs, "single")}
    # good answers 3 questions and the second turn; bad (eval format, one turn) only first turns.
    assert set(got) == {(1, "good", 1), (2, "good", 1), (3, "good", 1), (3, "good", 2),
                        (1, "bad", 1), (2, "bad", 1), (3, "bad", 1)}
    assert {k: r["score"] for k, r in got.items()} == {(1, "good", 1): 8, (2, "good", 1): 8, (3, "good", 1): 8,
                                                       (3, "good", 2): 8, (1, "bad", 1): -1, (2, "bad", 1): 3,
                                                       (3, "bad", 1): 3}
    assert got[(2, "bad", 1)]["judge"] == ["judge-x", "single-math-v1"]
    assert "[The Start of Reference Answer]\nREFERENCE: 4\n" in got[(2, "bad", 1)]["user_prompt"]
    assert got[(3, "good", 2)]["judge"] == ["judge-x", "single-v1-multi-turn"]
    assert "### User:\nAnd a moon of it?\n\n### Assistant A:\nGOOD answer 3.2" in got[(3, "good", 2)]["user_prompt"]
    # 7 judgments, 3 failed tries (429, 500, a reply slower than timeout_s) retried.
    results = json.loads((out / "results.json").read_text())
    assert (results["sent"], results["retries"], len(judge.requests)) == (7, 3, 10)
    assert results["second_turns_not_judged"] == {"good": 0, "bad": 1}
    assert results["prompt_tokens"] == 700 and results["completion_tokens"] == 140
    summary = results["summary"]
    assert summary["parse_failures"] == 1
    assert summary["models"]["good"]["mean"] == 8 and summary["models"]["bad"]["n"] == 2
    assert summary["vs_baseline"]["good"]["n"] == 2 and summary["vs_baseline"]["good"]["difference"] == 5
    assert summary["vs_baseline"]["good"]["win"] == 1.0
    # The plain OpenAI request: path, model, messages, temperature 0, max_tokens 2048, the key as a Bearer token.
    assert {r["path"] for r in judge.requests} == {"/v1/chat/completions"}
    assert all(r["auth"] == f"Bearer {KEY}" for r in judge.requests)
    body = judge.requests[-1]["body"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-x", 0.0, 2048)
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    assert (out / "scores.png").read_bytes().startswith(b"\x89PNG") and (out / "DONE").exists()
    ledger = [json.loads(line) for line in (inputs["run_dir"] / "ledger.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["status"], r["devices"], r["device_type"]) for r in ledger] == \
        [("judge", "completed", 1, "cpu")]
    assert "| good | 8.000 ± 0.000 | 3 | 4 |" in (out / "results.md").read_text()  # 3 questions, 4 judgments
    # The key is in no output and no file; the config names only its variable.
    assert KEY not in done.stdout + done.stderr
    assert all(KEY not in p.read_text(errors="replace") for p in inputs["run_dir"].rglob("*") if p.is_file())
    assert "api_key_env: JUDGE_TEST_KEY" in (out / "config.yaml").read_text()


def test_a_failed_run_resumes_sending_only_the_missing_judgments(inputs, serve):
    first = Judge(grade, fail_after=3)
    failed = run_judge(inputs, url := serve(first), "judge.concurrency=1", "judge.max_retries=1")
    assert failed.returncode == 2
    assert re.search(r"orlhf judge: error: judge.max_retries: .*HTTP 500 on all 2 tries", failed.stderr)
    assert len(records(inputs, "single")) == 3 and not (inputs["run_dir"] / "judge" / "DONE").exists()
    sent_first = {r["body"]["messages"][-1]["content"] for r in first.requests[:3]}

    second = Judge(grade)
    resumed = run_judge(inputs, serve(second, url), "judge.concurrency=3")
    assert resumed.returncode == 0, resumed.stderr
    asked = [r["body"]["messages"][-1]["content"] for r in second.requests]
    assert len(asked) == 4 and not set(asked) & sent_first
    assert len(records(inputs, "single")) == 7
    assert json.loads((inputs["run_dir"] / "judge" / "results.json").read_text())["sent"] == 4

    third = Judge(grade)
    again = run_judge(inputs, serve(third, url), "judge.concurrency=3")
    assert again.returncode == 0 and third.requests == []
    assert len(records(inputs, "single")) == 7


class Refusing(Handler):
    refusal = (401, "invalid api key")

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        status, message = self.server.refusal
        self._send(status, {"error": {"message": message}})


@pytest.mark.parametrize("status, message, key", [
    (401, "invalid api key", "judge.api_key_env"),
    (400, "the prompt plus max_tokens exceeds the context of 512 tokens", "judge.max_tokens"),
    (404, "no such route", "judge.base_url"),
])
def test_refusals_are_one_line_errors_naming_the_key(inputs, status, message, key):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    server.refusal = (status, message)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        refused = run_judge(inputs, f"http://127.0.0.1:{server.server_address[1]}/v1")
    finally:
        server.shutdown()
        server.server_close()
    assert refused.returncode == 2, refused.stderr
    assert f"orlhf judge: error: {key}: " in refused.stderr and f"HTTP {status}: " in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and KEY not in refused.stdout + refused.stderr


def test_an_unset_key_variable_is_an_error_before_any_request(inputs, serve):
    judge = Judge(grade)
    unset = run_judge(inputs, serve(judge), key="")
    assert unset.returncode == 2
    assert "judge.api_key_env: the environment variable JUDGE_TEST_KEY is unset or empty" in unset.stderr
    assert judge.requests == []


def position_biased_verdict(prompt: str) -> str:
    """Prefers the GOOD answer on question 1; always says A on question 2 (a position bias,
    so the verdict flips with the order)."""
    if "Describe the sea." not in prompt:
        return "Both fine. [[A]]"
    shown_a = prompt.split("[The Start of Assistant A's Answer]\n")[1]
    return "Final verdict: [[A]]" if shown_a.startswith("GOOD") else "Final verdict: [[B]]"


def test_pairwise_judges_both_orders_and_reports_inconsistency(inputs, serve, tmp_path):
    inputs["questions"] = write_jsonl(tmp_path / "q2.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["Describe the sea."]},
        {"question_id": 2, "category": "stem", "turns": ["Name a planet."]},
        {"question_id": 3, "category": "stem", "turns": ["Say hi."]}])
    inputs["bad"] = write_jsonl(tmp_path / "bad2.jsonl", [{"prompt": "Describe the sea.", "response": "BAD sea"},
                                                          {"prompt": "Name a planet.", "response": "BAD planet"},
                                                          {"prompt": "Say hi.", "response": "GOOD answer 3.1"}])
    judge = Judge(position_biased_verdict)
    done = run_judge(inputs, serve(judge), "format=pairwise")
    assert done.returncode == 0, done.stderr
    games = {r["question_id"]: r for r in records(inputs, "pairwise")}
    assert (games[1]["model_1"], games[1]["model_2"]) == ("good", "bad")
    assert (games[1]["g1_winner"], games[1]["g2_winner"]) == ("model_1", "model_1")
    assert (games[2]["g1_winner"], games[2]["g2_winner"]) == ("model_1", "model_2")
    assert games[1]["g2_user_prompt"].startswith("[User Question]\nDescribe the sea.\n\n[The Start of Assistant A's "
                                                 "Answer]\nBAD sea\n")
    # Question 3's answers are identical, so both orders are one request: 2 + 2 + 1 sent.
    assert len(judge.requests) == 5 and len(games) == 3
    assert (games[3]["g1_winner"], games[3]["g2_winner"]) == ("model_1", "model_2")
    summary = json.loads((inputs["run_dir"] / "judge" / "results.json").read_text())["summary"]
    row = summary["games"][0]
    assert (row["model"], row["opponent"], row["n"]) == ("good", "bad", 3)
    assert (row["win"], row["tie"], row["loss"]) == pytest.approx((1 / 3, 2 / 3, 0.0))
    assert summary["inconsistency_rate"] == pytest.approx(2 / 3)
    assert "Order inconsistency" in (inputs["run_dir"] / "judge" / "results.md").read_text()


TRUE_SCORES = {"good": 9, "bad": 3, "mid": 6}


def scores_by_content(prompt: str) -> str:
    """Reads which anonymous assistant shows which model's answer and scores each by model."""
    lines = ["Explanations first: Assistant A: is discussed here without a score."]
    for letter, answer in re.findall(r"The answer of Assistant ([A-Z]):\n(\S+)", prompt):
        lines.append(f"**Assistant {letter}**: {TRUE_SCORES[answer.split('-')[0].lower()]}")
    return "\n".join(lines)


def test_paper_format_anonymizes_shuffles_and_attributes_scores_back(inputs, serve, tmp_path):
    questions = [{"question_id": i, "category": "generic", "turns": [f"Question {i}?"]} for i in range(8)]
    inputs["questions"] = write_jsonl(tmp_path / "q8.jsonl", questions)
    files = {m: write_jsonl(tmp_path / f"{m}.jsonl", [{"question_id": i, "choices": [{"turns": [f"{m.upper()}-{i}"]}]}
                                                      for i in range(8)]) for m in TRUE_SCORES}
    judge = Judge(scores_by_content)
    done = run_judge(inputs, serve(judge), "format=paper", "seed=7", "judge_prompts=''", answers=files)
    assert done.returncode == 0, done.stderr
    rows = records(inputs, "paper")
    assert len(rows) == 24 and len(judge.requests) == 8
    assert all(r["score"] == TRUE_SCORES[r["model"]] for r in rows)
    assert all(r["rank_score"] == {"good": 3, "mid": 2, "bad": 1}[r["model"]] for r in rows)
    assert len({tuple(r["order"]) for r in rows}) > 1  # shuffled per question
    for request in judge.requests:  # no model name reaches the judge
        assert not re.search(r"Assistant (good|bad|mid)", request["body"]["messages"][-1]["content"])
    summary = json.loads((inputs["run_dir"] / "judge" / "results.json").read_text())["summary"]
    assert {m: row["mean"] for m, row in summary["models"].items()} == TRUE_SCORES
    assert summary["vs_baseline"]["good"]["win"] == 1.0 and summary["parse_failures"] == 0


class Proxy(BaseHTTPRequestHandler):
    """A forwarding HTTP proxy: takes requests in absolute form (`POST http://host/path`, as a
    client sends them to a proxy), records the host each names and sends it to the upstream
    judge, whatever the host: so a name only the proxy handles reaches the judge."""

    def do_POST(self):
        target = urlsplit(self.path)
        self.server.hosts.append(target.netloc)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "proxy-connection")}
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=10)
        try:
            upstream.request("POST", target.path, body, headers)
            reply = upstream.getresponse()
            data = reply.read()
        finally:
            upstream.close()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.getheader("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy():
    servers = []

    def start(upstream_url: str) -> tuple[str, list[str]]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
        server.daemon_threads, server.hosts = True, []
        parts = urlsplit(upstream_url)
        server.upstream = (parts.hostname, parts.port)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server.hosts

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_proxy_the_environment_names_carries_the_requests(inputs, serve, proxy):
    judge = Judge(grade)
    proxy_url, hosts = proxy(serve(judge))
    # Without the proxy the name does not resolve, and the error says so (a typo, not an outage).
    direct = run_judge(inputs, "http://judge.invalid/v1", "judge.max_retries=1")
    assert direct.returncode == 2 and len(direct.stderr.strip().splitlines()) == 1, direct.stderr
    assert re.search(r"orlhf judge: error: judge.base_url: http://judge.invalid/v1/chat/completions: cannot connect "
                     r"\(ConnectError: \[Errno -?\d+\] \w.*\) on all 2 tries; .*HTTP\(S\)_PROXY", direct.stderr)
    assert judge.requests == []

    done = run_judge(inputs, "http://judge.invalid/v1", env={"HTTP_PROXY": proxy_url})
    assert done.returncode == 0, done.stderr
    assert len(judge.requests) == 7 and hosts == ["judge.invalid"] * 7
    assert {r["path"] for r in judge.requests} == {"/v1/chat/completions"}
    assert all(r["auth"] == f"Bearer {KEY}" for r in judge.requests)
    results = json.loads((inputs["run_dir"] / "judge" / "results.json").read_text())
    assert results["base_url"] == "http://judge.invalid/v1" and results["summary"]["models"]["good"]["mean"] == 8


def test_a_failed_connection_names_its_cause(inputs, serve):
    judge = Judge(grade)
    # https to a plain http server: the TLS handshake fails on every try, and the error says why.
    url = serve(judge).replace("http://", "https://")
    failed = run_judge(inputs, url, "judge.max_retries=1")
    assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert re.search(r"orlhf judge: error: judge.base_url: https://.*: cannot connect \(ConnectError: .*SSL.*\) "
                     r"on all 2 tries; check its host and scheme", failed.stderr)
    assert judge.requests == []


def test_judgments_made_at_another_address_are_reused_and_said_so(inputs, serve):
    """A judge is its model name (a served judge's node and port change from job to job): a
    rerun told another address reuses what the same model judged, and names that address;
    another model name judges again."""
    first, second = Judge(grade), Judge(lambda prompt: "Fine. Rating: [[5]]")
    url_1, url_2 = serve(first), serve(second)
    assert run_judge(inputs, url_1).returncode == 0 and len(first.requests) == 7
    moved = run_judge(inputs, url_2)
    assert moved.returncode == 0 and second.requests == [], moved.stderr
    assert f"judge: 7 judgments reused were made by judge-x at {url_1} (a judgment is keyed by the judge's model " \
           "name, not its address)" in moved.stdout
    renamed = run_judge(inputs, url_2, "judge.model=judge-y")
    assert renamed.returncode == 0 and len(second.requests) == 7 and "reused were made" not in renamed.stdout
    assert {r["score"] for r in records(inputs, "single")} == {5}


CONTEXT_ERROR = {"message": "the messages have 600 tokens, the model's context is 512 tokens",
                 "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}


def unusable_for_two(prompt: str):
    """`orlhf serve`'s context_length_exceeded for good's answer to question 1, null content
    (a reasoning model cut off) for bad's to question 2, `grade` otherwise."""
    answer = prompt.split("[The Start of Assistant's Answer]\n")[-1]
    if "Describe the sea." in prompt and answer.startswith("GOOD"):
        return 400, CONTEXT_ERROR
    if "What is 2 + 2?" in prompt and answer.startswith("BAD"):
        return None
    return grade(prompt)


def test_unusable_judgments_are_skipped_counted_and_cached_unless_strict(inputs, serve):
    judge = Judge(unusable_for_two)
    url = serve(judge)
    strict = run_judge(inputs, url, "strict=true", "judge.concurrency=1")
    assert strict.returncode == 2 and len(strict.stderr.strip().splitlines()) == 1, strict.stderr
    assert re.search(r"orlhf judge: error: strict: question_id 1 turn 1, good: the judge gave no usable judgment "
                     r"\(context_length_exceeded: .*the model's context is 512 tokens", strict.stderr)
    assert len(judge.requests) == 1  # the first match; nothing else was sent

    done = run_judge(inputs, url)
    assert done.returncode == 0, done.stderr
    assert len(judge.requests) == 7  # the logged context error was not sent again, nor retried
    got = {(r["question_id"], r["model"]): r for r in records(inputs, "single") if r["turn"] == 1}
    assert (got[(1, "good")]["error"], got[(1, "good")]["score"], got[(1, "good")]["judgment"]) == \
        ("context_length_exceeded", -1, "$ERROR$")
    assert (got[(2, "bad")]["error"], got[(2, "bad")]["score"]) == ("no_content", -1)
    assert "error" not in got[(3, "bad")]
    summary = json.loads((inputs["run_dir"] / "judge" / "results.json").read_text())["summary"]
    assert summary["unusable"] == {"good": {"context_length_exceeded": 1}, "bad": {"no_content": 1}}
    assert summary["models"]["good"]["unusable"] == {"context_length_exceeded": 1}
    assert summary["parse_failures"] == 1  # bad's UNREADABLE answer: a reply, but no rating in it
    assert (summary["models"]["good"]["n"], summary["models"]["good"]["judgments"], summary["models"]["bad"]["n"]) \
        == (2, 3, 1)
    line = "2 unusable judgments (good: context_length_exceeded 1; bad: no_content 1)"
    assert f"judge: {line} skipped" in done.stdout and line in (inputs["run_dir"] / "judge" / "results.md").read_text()
    # 6 sent: the strict run logged the first
    assert re.search(rf"judge: 7 judgments \(6 requests sent, 0 retries; {re.escape(line)} skipped\) in ", done.stdout)

    again = run_judge(inputs, url)
    assert again.returncode == 0 and len(judge.requests) == 7
    strict_again = run_judge(inputs, url, "strict=true")
    assert strict_again.returncode == 2 and "error: strict: question_id 1 turn 1, good:" in strict_again.stderr
    assert len(judge.requests) == 7


def test_a_run_in_which_nothing_could_be_judged_fails_naming_the_setting(inputs, serve):
    """Every request past the judge's context (judge.max_tokens above what `orlhf serve`'s
    model leaves): nothing was judged, so the stage fails in one line, without DONE."""
    judge = Judge(lambda prompt: (400, CONTEXT_ERROR))
    done = run_judge(inputs, serve(judge))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert re.search(r"orlhf judge: error: judge.max_tokens: \d+: all 7 requests were refused by http://127.0.0.1:"
                     r"\d+/v1 \(7 past its context; first: .*\); lower judge.max_tokens", done.stderr)
    assert not (inputs["run_dir"] / "judge" / "DONE").exists()
    nothing = Judge(lambda prompt: None)  # null content every time
    failed = run_judge(inputs, serve(nothing), "judge.model=silent")
    assert failed.returncode == 2 and "error: judge.model: silent at http://127.0.0.1:" in failed.stderr
