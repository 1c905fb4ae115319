"""The OpenAI-compatible server on 127.0.0.1 (in this process, one rank) answering the
`openai` client: its answers equal the engine's own for the same prompt and settings,
sampling honours n and seed, stop strings and max_tokens end answers as OpenAI's do, bad
requests get 4xx JSON errors and the server goes on, and concurrent requests share a batch."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest

from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_prompt
from offline_rlhf.generation import engine
from offline_rlhf.generation.engine import Completion, Request, answer_text, run
from tests.unit.serving.tiny import (
    KEY,
    NAME,
    InProcess,
    make_tokenizer,
    write_lm_checkpoint,
    write_thinking_chat_checkpoint,
)

PROMPT = "Say something about apple."
MAX_BODY_KB = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_ckpt")
    return write_lm_checkpoint(root / "sft" / "checkpoints", make_tokenizer(root / "tokenizer"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    running = InProcess(checkpoint, tmp_path_factory.mktemp("serve_stage"), max_body_kb=MAX_BODY_KB, max_n=4)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def engine_tokens(server, prompt: list[int], max_new: int) -> Completion:
    """What the engine itself answers greedily for one prompt, alone (the reference)."""
    tokenizer = server.served.tokenizer
    [completion] = run(server.served.model, [Request(prompt, 0, max_new)], GenerationConfig(max_new_tokens=max_new),
                       tokenizer.eos_id, tokenizer.pad_id, "cpu")
    return completion


def test_chat_answers_the_openai_client_as_the_engine_answers(server, client):
    answer = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}],
                                            temperature=0, max_tokens=8)
    tokenizer = server.served.tokenizer
    prompt = encode_prompt(tokenizer, ChatTemplate(), PROMPT)  # exactly how `orlhf eval` encodes it
    reference = engine_tokens(server, prompt, 8)
    [choice] = answer.choices
    assert choice.message.content == answer_text(reference, tokenizer.decode, []) and choice.message.role == "assistant"
    assert choice.finish_reason == ("stop" if reference.finish == "eos" else "length")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), len(reference.tokens))
    assert answer.usage.total_tokens == len(prompt) + len(reference.tokens) and answer.model == NAME


def test_completions_continue_the_raw_prompt_and_max_tokens_ends_with_length(server, client):
    text = "User: good apple Assistant:"
    answer = client.completions.create(model=NAME, prompt=text, temperature=0, max_tokens=5)
    tokenizer = server.served.tokenizer
    reference = engine_tokens(server, tokenizer.encode(text), 5)
    assert reference.finish == "length"  # random weights: no EOS within 5 tokens
    [choice] = answer.choices
    assert choice.text == tokenizer.decode(reference.tokens) and choice.finish_reason == "length"
    assert answer.usage.completion_tokens == 5 and answer.usage.prompt_tokens == len(tokenizer.encode(text))


def test_n_samples_differ_and_a_seed_reproduces_them(client):
    def sample(seed, n=3):
        answer = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}],
                                                temperature=1.0, top_p=0.95, max_tokens=6, n=n, seed=seed)
        assert [c.index for c in answer.choices] == list(range(n))
        return [c.message.content for c in answer.choices]

    first = sample(7)
    assert len(set(first)) == 3  # three streams, three different answers
    assert sample(7) == first  # the same seed, the same answers
    assert sample(8) != first
    assert sample(7, n=1) == first[:1]  # sample i does not depend on how many were asked for


def test_completions_with_several_prompts_give_n_choices_each_in_order(server, client):
    prompts = ["User: apple Assistant:", "User: river stone Assistant:"]
    answer = client.completions.create(model=NAME, prompt=prompts, temperature=0, max_tokens=4, n=2)
    texts = [c.text for c in answer.choices]
    tokenizer = server.served.tokenizer
    alone = [tokenizer.decode(engine_tokens(server, tokenizer.encode(p), 4).tokens) for p in prompts]
    assert texts == [alone[0], alone[0], alone[1], alone[1]]  # greedy: n copies
    assert answer.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)


def test_a_stop_string_ends_the_answer_before_it(client):
    full = client.completions.create(model=NAME, prompt="User: cloud music Assistant:", temperature=0, max_tokens=24)
    text = full.choices[0].text
    match = re.search(r"[A-Za-z0-9]{2}", text[1:])
    assert match, f"expected two ASCII characters in a row somewhere in {text!r}"
    stop = match.group(0)
    cut = client.completions.create(model=NAME, prompt="User: cloud music Assistant:", temperature=0, max_tokens=24,
                                    stop=[stop, "never-there"])
    [choice] = cut.choices
    assert choice.text == text[:text.index(stop)] and choice.finish_reason == "stop"
    assert cut.usage.completion_tokens < 24


def raw(server, path: str, body, headers: dict | None = None, method: str = "POST") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.request(method, f"{server.url}{path}", content=content, timeout=30,
                         headers={"Content-Type": "application/json", **(headers or {})})


CHAT = {"model": NAME, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}
BAD_CHAT = {
    "bad JSON": (b'{"model": "tiny", "messages": [', 400, None),
    "not an object": ([CHAT], 400, None),
    "NaN": (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None),
    "unknown field": ({**CHAT, "temprature": 0.5}, 400, "unknown_parameter"),
    "temperature of the wrong type": ({**CHAT, "temperature": "hot"}, 400, "invalid_type"),
    "a bool for max_tokens": ({**CHAT, "max_tokens": True}, 400, "invalid_type"),
    "max_tokens 0": ({**CHAT, "max_tokens": 0}, 400, "invalid_value"),
    "n too large": ({**CHAT, "n": 5}, 400, "invalid_value"),
    "temperature too high": ({**CHAT, "temperature": 2.5}, 400, "invalid_value"),
    "missing messages": ({"model": NAME}, 400, "missing_required_parameter"),
    "unknown model": ({**CHAT, "model": "gpt-4"}, 404, "model_not_found"),
    "penalty": ({**CHAT, "presence_penalty": 0.5}, 400, "unsupported_parameter"),
    "stream of the wrong type": ({**CHAT, "stream": "yes"}, 400, "invalid_type"),
    "stream_options without stream": ({**CHAT, "stream": False, "stream_options": {"include_usage": True}}, 400,
                                      None),
    "an unknown stream option": ({**CHAT, "stream": True, "stream_options": {"usage": True}}, 400,
                                 "unknown_parameter"),
    "ends with the assistant": ({**CHAT, "messages": [{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"}]}, 400, None),
    "system after user": ({**CHAT, "messages": [{"role": "user", "content": "a"},
                                                {"role": "system", "content": "b"}]}, 400, None),
    "unknown role": ({**CHAT, "messages": [{"role": "tool", "content": "a"}]}, 400, None),
    "empty stop": ({**CHAT, "stop": [""]}, 400, None),
    "five stops": ({**CHAT, "stop": list("abcde")}, 400, None),
    "over the context": ({**CHAT, "max_tokens": 60}, 400, "context_length_exceeded"),
    "template variables for the paper's format": ({**CHAT, "chat_template_kwargs": {"enable_thinking": True}}, 400,
                                                  None),
    "a template variable the renderer sets": ({**CHAT, "chat_template_kwargs": {"messages": []}}, 400, None),
    "body over the cap": ({**CHAT, "messages": [{"role": "user", "content": "x" * MAX_BODY_KB * 1024}]}, 413,
                          "request_too_large"),
}


def streamed_body(body):
    """The same request, asking for a streamed answer (a JSON object that does not say)."""
    return {**body, "stream": True} if isinstance(body, dict) and "stream" not in body else body


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", BAD_CHAT)
def test_bad_requests_get_4xx_json_errors_and_the_server_goes_on(server, client, case, stream):
    """Streamed or not, a request refused is refused with the same JSON error."""
    body, status, code = BAD_CHAT[case]
    response = raw(server, "/v1/chat/completions", streamed_body(body) if stream else body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "\n" not in error["message"] and error["type"] == "invalid_request_error"
    assert code is None or error["code"] == code, error
    answer = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=2)
    assert answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("content_type, status", [
    ("application/json", 200), ("application/json; charset=utf-8", 200), ("Application/JSON", 200),
    ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("multipart/form-data; boundary=x", 415),
    ("application/jsonx", 415), (None, 415),
])
def test_a_post_must_say_its_body_is_json(server, content_type, status):
    """Browsers send text/plain, form and multipart bodies cross-site without asking (no
    CORS preflight): refusing them keeps a web page from driving a keyless local server."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps(CHAT).encode(), headers=headers,
                          timeout=30)
    assert response.status_code == status, response.text
    if status == 415:
        assert response.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("host, status", [
    ("127.0.0.1", 200), ("127.0.0.1:8000", 200), ("localhost:8000", 200), ("LOCALHOST", 200), ("[::1]:8000", 200),
    ("[::1]", 200), ("127.0.0.2:80", 200), ("evil.example", 400), ("evil.example:8000", 400),
    ("127.0.0.1.evil.example", 400), ("localhost.evil.example:80", 400), ("[::2]:80", 400), ("", 400),
])
def test_without_an_api_key_only_loopback_host_names_are_answered(server, host, status):
    """DNS rebinding: a page on evil.example re-points its name at 127.0.0.1 and reads the
    answers as same-origin; the request still says Host: evil.example."""
    for path, method, body in (("/v1/chat/completions", "POST", CHAT), ("/v1/models", "GET", b""),
                               ("/health", "GET", b"")):
        response = raw(server, path, body, {"Host": host}, method=method)
        assert response.status_code == status, (path, response.text)
        if status == 400:
            assert response.json()["error"]["code"] == "invalid_host"


def test_an_integer_too_long_for_python_is_a_bad_request(checkpoint, tmp_path):
    """Python refuses to convert integers of over 4300 digits (a ValueError that is no
    JSONDecodeError): a 400, not a 500 (the module's server caps bodies below that size)."""
    roomy = InProcess(checkpoint, tmp_path / "serve", max_body_kb=16)
    try:
        body = json.dumps(CHAT).encode()[:-1] + b', "seed": 1' + b"0" * 5000 + b"}"
        response = raw(roomy, "/v1/chat/completions", body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"].startswith("the body is not valid JSON")
        assert raw(roomy, "/v1/chat/completions", CHAT).status_code == 200
    finally:
        roomy.close()


def test_a_prompt_over_the_context_is_the_messages_fault_and_a_budget_over_the_room_max_tokens(server):
    long = {**CHAT, "messages": [{"role": "user", "content": "apple " * 100}]}
    del long["max_tokens"]
    errors = [raw(server, path, body).json()["error"] for path, body in (
        ("/v1/chat/completions", long), ("/v1/chat/completions", {**CHAT, "max_tokens": 60}),
        ("/v1/completions", {"model": NAME, "prompt": ["a", "apple " * 100]}))]
    assert [(e["param"], e["code"]) for e in errors] == [("messages", "context_length_exceeded"),
                                                         ("max_tokens", "context_length_exceeded"),
                                                         ("prompt", "context_length_exceeded")]
    assert errors[0]["message"].startswith("the messages have ") and errors[2]["message"].startswith("prompt 1 has ")


def test_a_model_is_retrieved_by_its_id(client):
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


def test_completions_refuse_token_ids_and_too_many_prompts(server):
    base = {"model": NAME, "max_tokens": 2}
    assert raw(server, "/v1/completions", {**base, "prompt": [[1, 2, 3]]}).status_code == 400
    assert raw(server, "/v1/completions", {**base, "prompt": ["a"] * 17}).status_code == 400
    assert raw(server, "/v1/completions", {**base, "prompt": ""}).json()["error"]["message"] == "prompt 0 is empty"


def test_the_openai_client_raises_the_servers_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match=r"n must be in \[1, 4\], got 9"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], n=9)


def test_models_health_and_unknown_routes(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert raw(server, "/health", b"", method="GET").json() == {"status": "ok", "model": NAME, "ready": True}
    missing = raw(server, "/v1/embeddings", {"model": NAME})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert raw(server, "/v1/models", {}).status_code == 405


def test_a_system_message_is_prepended_to_the_first_user_turn(server, client):
    with_system = client.chat.completions.create(model=NAME, temperature=0, max_tokens=6, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}])
    folded = client.chat.completions.create(model=NAME, temperature=0, max_tokens=6, messages=[
        {"role": "user", "content": f"Be brief.\n\n{PROMPT}"}])
    assert with_system.choices[0].message.content == folded.choices[0].message.content
    assert with_system.usage.prompt_tokens == folded.usage.prompt_tokens


def test_multi_turn_chat_is_rendered_with_the_template(server, client):
    turns = [{"role": "user", "content": "apple"}, {"role": "assistant", "content": "river"},
             {"role": "user", "content": "stone"}]
    answer = client.chat.completions.create(model=NAME, temperature=0, max_tokens=4, messages=turns)
    tokenizer = server.served.tokenizer
    prompt = tokenizer.encode("User: apple Assistant: river User: stone Assistant:")
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.choices[0].message.content == answer_text(engine_tokens(server, prompt, 4), tokenizer.decode, [])


def test_a_requests_chat_template_kwargs_reach_the_models_chat_template(tmp_path):
    """vLLM's chat_template_kwargs: a chat model trained with thinking=false is prompted
    with thinking on for the request that asks for it, and as trained for the next one."""
    chat = write_thinking_chat_checkpoint(tmp_path / "chat" / "checkpoints", make_tokenizer(tmp_path / "tokenizer"),
                                          tmp_path / "chat_tokenizer")
    running = InProcess(chat, tmp_path / "serve")
    try:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "apple"}]
        for kwargs, text in (({"thinking": True}, "[system] be brief\n[user] apple\n[assistant] "),
                             (None, "[system] be brief\n[user] apple\n[assistant] [quick] ")):
            body = {"model": NAME, "messages": messages, "max_tokens": 2, "temperature": 0,
                    **({"chat_template_kwargs": kwargs} if kwargs else {})}
            response = raw(running, "/v1/chat/completions", body)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["prompt_tokens"] == len(running.served.tokenizer.encode(text))
    finally:
        running.close()


def test_an_api_key_is_required_when_configured(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    keyed = InProcess(checkpoint, tmp_path / "serve", api_key_env="SERVE_TEST_KEY")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for body in (CHAT, streamed_body(CHAT)):
                response = raw(keyed, "/v1/chat/completions", body, headers)
                assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert raw(keyed, "/v1/models", b"", {}, method="GET").status_code == 401
        assert raw(keyed, "/health", b"", method="GET").status_code == 200  # probes need no key
        assert raw(keyed, "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {KEY}", "Host": "api.example:443"}
                   ).status_code == 200  # with a key, any Host name
        plain = {"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"}
        assert raw(keyed, "/v1/chat/completions", CHAT, plain).status_code == 415
        assert raw(keyed, "/v1/chat/completions", CHAT, {"Content-Type": "text/plain"}).status_code == 401
        with openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0) as client:
            assert client.chat.completions.create(model=NAME, messages=CHAT["messages"], max_tokens=2).choices
    finally:
        keyed.close()


def test_concurrent_requests_share_one_batch_and_answer_as_alone(checkpoint, server, client, tmp_path):
    """Six requests queued while the engine is busy, greedy and sampled, run as one engine
    batch (each row by its own rule), and each gets the answer it gets alone."""
    asks = [dict(temperature=0, max_tokens=5, messages=[{"role": "user", "content": f"{w} apple"}])
            for w in ("good", "river", "stone")]
    asks += [dict(temperature=1.0, seed=s, max_tokens=5, messages=[{"role": "user", "content": "cloud"}])
             for s in (1, 2, 3)]
    alone = [client.chat.completions.create(model=NAME, **ask).choices[0].message.content for ask in asks]
    held = InProcess(checkpoint, tmp_path / "serve", start_engine=False)
    try:
        answers = [None] * len(asks)
        with openai.OpenAI(base_url=f"{held.url}/v1", api_key="unused", max_retries=0, timeout=60) as shared:
            def ask(index):
                answers[index] = shared.chat.completions.create(model=NAME, **asks[index]).choices[0].message.content
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while held.batcher._jobs.qsize() < len(asks) and time.monotonic() < deadline:
                time.sleep(0.01)
            held.thread.start()
            for thread in threads:
                thread.join(60)
        assert answers == alone
        assert wait_for(lambda: held.batcher.batches == 1)  # one engine run, not one per request or rule
        time.sleep(0.2)
        assert held.batcher.batches == 1
    finally:
        held.close()


@pytest.mark.parametrize("stream", [False, True])
def test_requests_queued_when_the_server_stops_get_503(checkpoint, tmp_path, stream):
    held = InProcess(checkpoint, tmp_path / "serve", start_engine=False)
    body = streamed_body(CHAT) if stream else CHAT
    try:
        answers = []
        waiting = threading.Thread(target=lambda: answers.append(raw(held, "/v1/chat/completions", body)))
        waiting.start()
        deadline = time.monotonic() + 30
        while held.batcher._jobs.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        held.batcher.stop()
        held.thread.start()  # serve() sees the stop at once and fails what is queued
        waiting.join(30)
        [response] = answers
        assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
        late = raw(held, "/v1/chat/completions", body)
        assert late.status_code == 503 and late.json()["error"]["type"] == "server_error"
    finally:
        held.close()


# --- streamed answers (stream: true) -------------------------------------------------------


def stream_chunks(server, path: str, body: dict) -> list[dict]:
    """A streamed answer's chunks, read as server-sent events; checks the framing: every
    event is `data: ...`, [DONE] ends it, and all chunks share id, created and model."""
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(event.startswith("data: ") for event in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(event[len("data: "):]) for event in events[:-1]]
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    return chunks


def choices_of(chunks: list[dict], chat: bool) -> dict[int, tuple[str, str]]:
    """Per choice index: its text (the pieces joined) and the finish_reason of its last
    chunk, the only one that has one."""
    texts, reasons = {}, {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            index = choice["index"]
            assert index not in reasons, "a chunk after the choice's last"
            piece = choice["delta"].get("content", "") if chat else choice["text"]
            texts[index] = texts.get(index, "") + piece
            if choice["finish_reason"] is not None:
                reasons[index] = choice["finish_reason"]
    assert reasons.keys() == texts.keys()
    return {index: (texts[index], reasons[index]) for index in sorted(texts)}


def answered(server, path: str, body: dict) -> tuple[dict[int, tuple[str, str]], dict]:
    """The same request not streamed: per choice (text, finish_reason), and the usage."""
    answer = raw(server, path, body).json()
    key = (lambda c: c["message"]["content"]) if path.endswith("chat/completions") else (lambda c: c["text"])
    return {c["index"]: (key(c), c["finish_reason"]) for c in answer["choices"]}, answer["usage"]


def a_stop_string_in(server, path: str, body: dict) -> str:
    """Two ASCII characters in a row from choice 0's answer (past its first character), so
    the stop string occurs."""
    text = answered(server, path, body)[0][0][0]
    match = re.search(r"[A-Za-z0-9]{2}", text[1:])
    assert match, f"expected two ASCII characters in a row somewhere in {text!r}"
    return match.group(0)


CHAT_ASK = {"model": NAME, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24}


@pytest.mark.parametrize("sampling, with_stop", [(dict(temperature=0), False),
                                                 (dict(temperature=1.0, n=2, seed=5), False),
                                                 (dict(temperature=1.0, top_p=0.9, n=2, seed=9), True)],
                         ids=["greedy", "sampled n=2", "sampled n=2 with a stop string"])
def test_a_streamed_chat_answer_is_the_unstreamed_answer_in_pieces(server, sampling, with_stop):
    body = {**CHAT_ASK, **sampling}
    if with_stop:
        body["stop"] = [a_stop_string_in(server, "/v1/chat/completions", body)]
    expected, usage = answered(server, "/v1/chat/completions", body)
    chunks = stream_chunks(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    n = body.get("n", 1)
    assert [c["choices"][0]["delta"] for c in chunks[:n]] == [{"role": "assistant", "content": ""}] * n
    assert [c["choices"][0]["index"] for c in chunks[:n]] == list(range(n))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    assert choices_of(chunks[:-1], chat=True) == expected
    if with_stop:
        assert expected[0][1] == "stop" and body["stop"][0] not in expected[0][0]


def test_streamed_completions_of_several_prompts_interleave_their_choices(server):
    body = {"model": NAME, "prompt": ["User: cloud music Assistant:", "river stone"], "max_tokens": 20, "n": 2,
            "temperature": 1.0, "seed": 3}
    body["stop"] = [a_stop_string_in(server, "/v1/completions", body)]
    expected, _ = answered(server, "/v1/completions", body)
    chunks = stream_chunks(server, "/v1/completions", body)
    assert choices_of(chunks, chat=False) == expected and len(expected) == 4
    assert expected[0][1] == "stop" and body["stop"][0] not in expected[0][0]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)  # no usage unless asked


def test_the_openai_client_reads_streamed_answers(server, client):
    ask = dict(model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=1.0, seed=4,
               n=2)
    whole = client.chat.completions.create(**ask)
    texts, reasons, usage = ["", ""], [None, None], None
    for chunk in client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices] and usage == whole.usage

    prompt = "User: good apple Assistant:"
    text = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8).choices[0].text
    stream = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == text


def held_decoding(server):
    """A forward hook on the real model that holds the next batch's first decode step (after
    its prefill) until the returned event is set; remove() the hook after."""
    wait_idle(server)  # no forward of an earlier batch counts
    release, forwards = threading.Event(), []

    def hold(module, args):
        forwards.append(1)
        if len(forwards) == 2:
            release.wait(30)

    return release, server.served.model.register_forward_pre_hook(hold)


def wait_idle(server) -> None:
    """Until no batch runs (a job is answered when its rows end, before its batch ends)."""
    assert wait_for(lambda: server.batcher.running is None and not server.batcher._jobs.qsize())


def wait_for(condition, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_client_leaving_mid_stream_frees_its_rows_and_the_server_goes_on(server, monkeypatch):
    """The engine is held at its first decode step while the client reads the first event
    and disconnects: the server notices (the job is given up), the row ends at the engine's
    next cancellation poll instead of decoding its whole answer, and the next request is
    answered."""
    body = {**CHAT_ASK, "temperature": 0, "max_tokens": 40}
    _, usage = answered(server, "/v1/chat/completions", body)
    assert usage["completion_tokens"] > 2 * engine.POLL_STEPS  # long enough to be cut short
    jobs, submit = [], server.batcher.submit
    monkeypatch.setattr(server.batcher, "submit", lambda job: jobs.append(job) or submit(job))
    release, hook = held_decoding(server)
    try:
        generated, batches = server.batcher.generated, server.batcher.batches
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=30) as response:
            first = next(response.iter_lines())
            assert json.loads(first[len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
        assert wait_for(jobs[0].gone.is_set) and server.batcher.batches == batches  # gone while its batch runs
    finally:
        release.set()
        hook.remove()
    assert wait_for(lambda: server.batcher.batches > batches)
    [[completion]] = jobs[0].future.result()
    assert completion.finish == "abort"
    assert server.batcher.generated - generated <= engine.POLL_STEPS + 2 < usage["completion_tokens"]
    assert answered(server, "/v1/chat/completions", body)[1] == usage
    assert choices_of(stream_chunks(server, "/v1/chat/completions", body), chat=True) == \
        answered(server, "/v1/chat/completions", body)[0]


def test_a_client_leaving_before_its_batch_starts_is_never_run(server, monkeypatch):
    """While a batch runs (held at its first decode step), a second request waits queued; its
    client times out and disconnects: the job is given up, and once the first batch ends
    no batch runs it."""
    jobs, submit = [], server.batcher.submit
    monkeypatch.setattr(server.batcher, "submit", lambda job: jobs.append(job) or submit(job))
    release, hook = held_decoding(server)
    batches = server.batcher.batches
    first = threading.Thread(target=answered, args=(server, "/v1/chat/completions", {**CHAT_ASK, "max_tokens": 4}))
    try:
        first.start()
        assert wait_for(lambda: len(jobs) == 1)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT_ASK, "max_tokens": 4}, timeout=1.0)
        assert wait_for(lambda: len(jobs) == 2 and jobs[1].gone.is_set())
    finally:
        release.set()
        hook.remove()
        first.join(30)
    assert wait_for(lambda: server.batcher.batches == batches + 1) and jobs[1].future.cancelled()
    time.sleep(0.3)  # the engine thread polls its queue every 0.05 s: nothing more runs
    assert server.batcher.batches == batches + 1


def arrivals_while_a_batch_runs(server, monkeypatch, asks: list[dict], batches_expected: int) -> tuple[list, int]:
    """The first request's batch is held at its first decode step until the others are
    queued; returns every answer and the number of engine batches they took (a job is
    answered when its rows end, its batch is counted when it ends: hence the wait)."""
    jobs, submit = [], server.batcher.submit
    monkeypatch.setattr(server.batcher, "submit", lambda job: jobs.append(job) or submit(job))
    release, hook = held_decoding(server)
    batches, answers = server.batcher.batches, [None] * len(asks)

    def ask(index):
        answers[index] = answered(server, "/v1/chat/completions", asks[index])

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(asks))]
    try:
        threads[0].start()
        assert wait_for(lambda: len(jobs) == 1)
        for queued, thread in enumerate(threads[1:], start=1):  # one after another: they arrive in this order
            thread.start()
            assert wait_for(lambda: server.batcher._jobs.qsize() == queued)  # queued (the first one runs)
    finally:
        release.set()
        hook.remove()
        for thread in threads:
            thread.join(30)
    monkeypatch.undo()
    wait_for(lambda: server.batcher.batches - batches >= batches_expected)
    time.sleep(0.2)  # and no batch more
    return answers, server.batcher.batches - batches


def test_requests_arriving_while_a_batch_runs_join_it_with_their_own_rules_and_stop_strings(server, monkeypatch):
    """Requests arriving while a greedy batch runs join it at the engine's next poll, each
    row keeping its own rule (greedy or sampled) and its own stop strings; every answer is
    the one its request gets alone."""
    first = {**CHAT_ASK, "temperature": 0, "max_tokens": 30}
    sampled = {**CHAT_ASK, "messages": [{"role": "user", "content": "river stone"}], "temperature": 1.0, "seed": 8}
    alone = [answered(server, "/v1/chat/completions", ask) for ask in (first, sampled)]
    stopped = {**first, "stop": [a_stop_string_in(server, "/v1/chat/completions", first)]}
    cut = answered(server, "/v1/chat/completions", stopped)
    (text, _), (cut_text, finish) = alone[0][0][0], cut[0][0]
    assert finish == "stop" and text.startswith(cut_text) and len(cut_text) < len(text)
    answers, batches = arrivals_while_a_batch_runs(server, monkeypatch, [first, stopped, sampled], 1)
    assert answers == [alone[0], cut, alone[1]] and batches == 1


def test_a_batch_kept_running_by_steady_load_holds_the_requests_in_flight_only(server):
    """Closed-loop clients keep one batch running as their requests join it: the batch's
    books never hold more rows than the requests in flight (answered ones leave them)."""
    wait_idle(server)
    held, stop = [], threading.Event()
    # Each thread's outcome (its finish reasons, or what it raised): an assert or an error
    # inside a thread would only be a warning, so the main thread checks them.
    finishes: dict[int, list[str] | BaseException] = {}

    def watch():
        while not stop.is_set():
            running = server.batcher.running
            held.append(len(running.rows) if running is not None else 0)
            time.sleep(0.001)

    def client(index):
        try:
            finishes[index] = [answered(server, "/v1/chat/completions", {
                **CHAT_ASK, "temperature": 1.0, "seed": 100 * index + k, "max_tokens": 12})[0][0][1] for k in range(8)]
        except BaseException as error:  # re-raised in the main thread
            finishes[index] = error

    batches, watcher = server.batcher.batches, threading.Thread(target=watch)
    clients = [threading.Thread(target=client, args=(index,)) for index in range(4)]
    watcher.start()
    try:
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(60)
    finally:
        stop.set()
        watcher.join()
    assert not any(thread.is_alive() for thread in clients), finishes  # no client hung
    for index in range(4):
        if isinstance(finishes[index], BaseException):
            raise finishes[index]
        assert len(finishes[index]) == 8 and set(finishes[index]) <= {"stop", "length"}, (index, finishes[index])
    wait_idle(server)
    assert server.batcher.batches - batches < 32 / 2  # the requests joined running batches
    assert 0 < max(held) <= 4  # one row per client in flight


def test_without_join_running_a_request_arriving_while_a_batch_runs_waits_for_its_end(checkpoint, tmp_path,
                                                                                    monkeypatch):
    held = InProcess(checkpoint, tmp_path / "serve", join_running=False)
    try:
        asks = [{**CHAT_ASK, "temperature": 0, "max_tokens": 30}, {**CHAT_ASK, "temperature": 0}]
        alone = [answered(held, "/v1/chat/completions", ask) for ask in asks]
        assert arrivals_while_a_batch_runs(held, monkeypatch, asks, 2) == (alone, 2)
    finally:
        held.close()


def test_a_batch_failing_mid_stream_ends_it_with_an_error_event(server, caplog):
    """The model fails at the first decode step (a forward hook raises, as a lost device
    would), after the job's first token was told: the status was sent, so the stream ends
    with an error event and [DONE]; the server goes on."""
    forwards = []

    def fail(module, args):
        forwards.append(1)
        if len(forwards) == 2:
            raise RuntimeError("device lost")

    body = {**CHAT_ASK, "temperature": 0, "stream": True}  # greedy: its first token is not EOS
    hook = server.served.model.register_forward_pre_hook(fail)
    try:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line]
    finally:
        hook.remove()
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["type"] == "server_error"
    assert_logged_not_told(error["message"], caplog)
    assert choices_of(stream_chunks(server, "/v1/chat/completions", CHAT_ASK), chat=True)[0][1] in ("stop", "length")


def assert_logged_not_told(message: str, caplog) -> None:
    """A 500's message names an error id and nothing of the exception; the log has the
    exception, with its traceback, under that id."""
    told = r"internal server error \(error id ([0-9a-f]{12}); the server's log has the details\)"
    match = re.fullmatch(told, message)
    assert match, message
    [record] = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert record.exc_info and str(record.exc_info[1]) == "device lost"


def test_a_failed_batch_is_a_500_naming_an_error_id_that_the_log_explains(server, caplog):
    def fail(module, args):
        raise RuntimeError("device lost")

    hook = server.served.model.register_forward_pre_hook(fail)
    try:
        response = raw(server, "/v1/chat/completions", CHAT)
    finally:
        hook.remove()
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert_logged_not_told(response.json()["error"]["message"], caplog)
    assert raw(server, "/v1/chat/completions", CHAT).status_code == 200  # the server goes on
