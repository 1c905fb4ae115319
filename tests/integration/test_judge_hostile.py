"""`orlhf judge` against a hostile or broken judge (a real HTTP server on 127.0.0.1 that
answers raw bytes): ratings off the 1-10 scale, a reply nested too deep for the JSON parser,
a reply of tens of MiB, a body its Content-Encoding does not describe, and a server that
echoes the API key back. Each is a counted unreadable rating or a one-line error; none is a
traceback, a crash on every rerun, a non-finite number in results.json, or the key printed
or written."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from offline_rlhf.eval.judge.client import MAX_REPLY_BYTES
from tests.integration.test_judge_stage import CONTEXT_ERROR, KEY, records, run_judge, write_inputs

MiB = 2**20


@pytest.fixture
def inputs(tmp_path):
    return write_inputs(tmp_path)


class Raw(BaseHTTPRequestHandler):
    """Answers each request with `server.answer(request)`: (status, headers, body chunks),
    the body streamed without a Content-Length (HTTP/1.0: it ends when the connection
    closes). `server.sent` counts the body bytes the client took."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, headers, chunks = self.server.answer({"auth": self.headers.get("Authorization"), "body": body})
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
                self.server.sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def raw_judge():
    servers = []

    def start(answer) -> tuple[str, ThreadingHTTPServer]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Raw)
        server.daemon_threads, server.answer, server.sent = True, answer, 0
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def chat(content, status=200) -> tuple[int, dict, list[bytes]]:
    """An OpenAI reply whose message content is `content` (or, for another status, an OpenAI
    error object `content`)."""
    payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop"}]} if status == 200 else {"error": content}
    return status, {"Content-Type": "application/json"}, [json.dumps(payload).encode()]


def prompt_of(request: dict) -> str:
    return request["body"]["messages"][-1]["content"]


def one_line_error(done, pattern: str) -> None:
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.search(pattern, done.stderr), done.stderr


OFF_SCALE = {1: "[[1000000]]", 2: "[[" + "9" * 5000 + "]]", 3: "[[" + "9" * 400 + ".5]]"}  # by question_id


def off_scale_ratings(request: dict):
    """`good` gets question 1's, 2's and 3's absurd ratings (first turn), everything else an 8."""
    prompt = prompt_of(request)
    answer = prompt.split("[The Start of Assistant's Answer]\n")[-1]
    questions = ((1, "Describe the sea."), (2, "What is 2 + 2?"), (3, "Name a planet."))
    qid = next(q for q, text in questions if text in prompt)
    rating = OFF_SCALE[qid] if answer.startswith("GOOD") and "moon" not in prompt else "[[8]]"
    return chat(f"Judged. Rating: {rating}")


def test_ratings_off_the_scale_are_counted_unreadable_in_this_run_and_every_rerun(inputs, raw_judge):
    url, _ = raw_judge(off_scale_ratings)
    done = run_judge(inputs, url)
    assert done.returncode == 0, done.stderr
    results_text = (inputs["run_dir"] / "judge" / "results.json").read_text()
    results = json.loads(results_text, parse_constant=lambda name: pytest.fail(f"results.json holds {name}"))
    good = results["summary"]["models"]["good"]
    # Only the second turn of question 3 got a rating on the scale.
    assert (good["mean"], good["judgments"], good["parse_failures"]) == (8, 1, 3)
    assert {(r["question_id"], r["turn"]): r["score"] for r in records(inputs, "single") if r["model"] == "good"} \
        == {(1, 1): -1, (2, 1): -1, (3, 1): -1, (3, 2): 8}
    # The rerun reads the same replies from calls.jsonl (nothing is sent again) and agrees.
    server_down = "http://127.0.0.1:9/v1"
    again = run_judge(inputs, server_down)
    assert again.returncode == 0, again.stderr
    assert json.loads((inputs["run_dir"] / "judge" / "results.json").read_text())["summary"] == results["summary"]


def test_a_reply_nested_too_deep_to_parse_is_a_one_line_error(inputs, raw_judge):
    url, _ = raw_judge(lambda request: (200, {}, [b"[" * 100_000, b"]" * 100_000]))
    one_line_error(run_judge(inputs, url), r"orlhf judge: error: judge.base_url: http://127.0.0.1:\d+/v1/chat/"
                                          r"completions answered without choices\[0\].message.content \(\[\[\[")


def test_a_body_its_content_encoding_does_not_describe_is_a_one_line_error(inputs, raw_judge):
    url, _ = raw_judge(lambda request: (200, {"Content-Encoding": "gzip"}, [b"not gzip at all"]))
    one_line_error(run_judge(inputs, url), r"orlhf judge: error: judge.base_url: http://127.0.0.1:\d+/v1/chat/"
                                          r"completions sent a body that cannot be decoded")


def huge_reply(request: dict):
    """A well-formed reply of 40 MiB, which a client reading it whole would take as a judgment."""
    return 200, {"Content-Type": "application/json"}, [b'{"choices": [{"message": {"content": "Rating: [[5]] ',
                                                       *(b"a" * MiB for _ in range(40)), b'"}}]}']


def test_a_reply_past_the_cap_is_cut_off_while_it_streams_and_is_a_one_line_error(inputs, raw_judge):
    url, server = raw_judge(huge_reply)
    done = run_judge(inputs, url, "judge.concurrency=1")
    one_line_error(done, rf"orlhf judge: error: judge.base_url: {url}/chat/completions sent a reply longer than "
                         rf"{MAX_REPLY_BYTES} bytes, far past any judgment; point it at an OpenAI-compatible")
    # The client stopped reading: what the server got out is the cap plus the sockets' buffers.
    assert server.sent < MAX_REPLY_BYTES + 24 * MiB < 40 * MiB
    calls = inputs["run_dir"] / "judge" / "calls.jsonl"
    assert not calls.exists() or calls.stat().st_size == 0


def echo_key(request: dict):
    """Echoes the Authorization header: in a context-length error for question 1 (its detail
    is recorded), in the judgment text otherwise."""
    if "Describe the sea." in prompt_of(request):
        return chat({**CONTEXT_ERROR, "message": f"too long for {request['auth']}"}, status=400)
    return chat(f"You sent {request['auth']}. Rating: [[7]]")


def test_a_key_the_judge_echoes_is_redacted_from_every_file_and_message(inputs, raw_judge):
    url, _ = raw_judge(echo_key)
    done = run_judge(inputs, url)
    assert done.returncode == 0, done.stderr
    assert KEY not in done.stdout + done.stderr
    files = [p for p in inputs["run_dir"].rglob("*") if p.is_file()]
    assert files and all(KEY not in p.read_text(errors="replace") for p in files)
    calls = [json.loads(line) for line in (inputs["run_dir"] / "judge" / "calls.jsonl").read_text().splitlines()]
    assert {c["judgment"] for c in calls if not c["error"]} == {"You sent Bearer [key redacted]. Rating: [[7]]"}
    assert {c["detail"] for c in calls if c["error"]} == {
        '{"error": {"message": "too long for Bearer [key redacted]", "type": "invalid_request_error", "param": '
        '"messages", "code": "context_length_exceeded"}}'}
    assert {r["score"] for r in records(inputs, "single") if not r.get("error")} == {7}


@pytest.mark.parametrize("key", [KEY, 'k3y-with-"quotes"-and-\\-0123456789'])
def test_a_refusal_that_echoes_the_key_does_not_print_it(inputs, raw_judge, key):
    """Verbatim, or JSON-escaped inside the error's string (`\\"`, `\\\\`), the key is redacted
    from the body the one-line error quotes."""
    url, _ = raw_judge(lambda request: chat({"message": f"bad key {request['auth']}"}, status=401))
    done = run_judge(inputs, url, key=key)
    one_line_error(done, r"orlhf judge: error: judge.api_key_env: .* answered HTTP 401: .*bad key Bearer "
                         r"\[key redacted\]")
    assert key not in done.stderr and json.dumps(key)[1:-1] not in done.stderr



def dripping(request: dict):
    """A well-formed reply a byte every 50 ms (about 6 s in all): no single read waits long."""
    _, headers, (body,) = chat("Rating: [[5]]")
    return 200, headers, (time.sleep(0.05) or body[i:i + 1] for i in range(len(body)))


def test_a_reply_dripped_a_byte_at_a_time_times_out_as_a_whole(inputs, raw_judge):
    """Was: judge.timeout_s bounded each read, so a dripping server held a call for as long
    as it liked."""
    url, _ = raw_judge(dripping)
    started = time.monotonic()
    done = run_judge(inputs, url, "judge.max_retries=1", "judge.concurrency=1")
    one_line_error(done, rf"orlhf judge: error: judge.max_retries: {url}/chat/completions: no answer within "
                         r"judge.timeout_s=0.5s on all 2 tries")
    assert time.monotonic() - started < 30
