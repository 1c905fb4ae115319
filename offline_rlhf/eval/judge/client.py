"""A plain OpenAI chat-completions client for the judge (`POST {base_url}/chat/completions`,
non-streaming), with retries and exponential backoff on HTTP 429, 5xx, timeouts and failed
connections. The environment's proxy and CA settings apply (HTTP(S)_PROXY, NO_PROXY,
SSL_CERT_FILE, SSL_CERT_DIR). The API key travels only in the Authorization header; no
message here ever contains it, and a reply that echoes it has it redacted before anything
reads the reply. A reply is read up to MAX_REPLY_BYTES, no further. A request the judge
cannot answer usefully (its prompt is longer than the judge's context, or the reply has no
content) is an unusable Reply, not an error: it tells nothing about the other requests.
Failures that retrying cannot fix are one-line ConfigErrors naming the key."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import httpx

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.judging import JudgeEndpointConfig
from offline_rlhf.http import key_from_env

MAX_RETRY_AFTER_S = 60.0  # a server's Retry-After is honoured up to this
SNIPPET = 200  # characters of an error body quoted in a message
ERROR_JUDGMENT = "$ERROR$"  # the judgment text of an unusable reply, as FastChat records an API error
CONTEXT_TOO_LONG = "context_length_exceeded"  # OpenAI's error code (also `orlhf serve`'s)
NO_CONTENT = "no_content"  # a reply whose message content is null (a refusal, a cut-off reasoning model)
# The most of a reply that is read: a judgment of max_tokens tokens is a few hundred KiB at most.
MAX_REPLY_BYTES = 8 * 2**20
REDACTED = "[key redacted]"  # replaces the API key wherever a reply echoes it


@dataclass(frozen=True)
class Reply:
    content: str
    retries: int
    prompt_tokens: int
    completion_tokens: int
    error: str = ""  # why the judge gave no usable judgment: CONTEXT_TOO_LONG or NO_CONTENT
    detail: str = ""  # what the server said about it


@dataclass(frozen=True)
class Answer:
    """An HTTP answer as read: its status, its body as text (the key redacted) and its Retry-After."""

    status: int
    text: str
    retry_after: str = ""


def api_key(cfg: JudgeEndpointConfig) -> str | None:
    """The key from the environment variable `judge.api_key_env` names, stripped (None when
    judge.api_key_env is empty)."""
    return key_from_env(cfg.api_key_env, "judge.api_key_env", f"export {cfg.api_key_env}=..., or leave "
                        "judge.api_key_env empty for a keyless endpoint")


class JudgeClient:
    """Use as `async with JudgeClient(cfg, key) as client: reply = await client.chat(messages)`."""

    def __init__(self, cfg: JudgeEndpointConfig, key: str | None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.cfg = cfg
        self.base_url = cfg.base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        # The key as a reply may echo it: verbatim, or JSON-escaped inside a string.
        self._key_forms = {key, json.dumps(key)[1:-1]} if key else set()
        self._sleep = sleep
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> JudgeClient:
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        # trust_env: the proxy and CA bundle a cluster sets in the environment (httpx 0.28 reads no netrc).
        self._http = httpx.AsyncClient(timeout=self.cfg.timeout_s, limits=limits, trust_env=True)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()

    async def chat(self, messages: list[dict[str, str]]) -> Reply:
        body = {"model": self.cfg.model, "messages": messages, "n": 1,
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        for attempt in range(self.cfg.max_retries + 1):
            problem, wait = await self._try(body)
            if isinstance(problem, Reply):
                return replace(problem, retries=attempt)
            if attempt < self.cfg.max_retries:
                await self._sleep(wait if wait is not None else self.cfg.backoff_s * 2 ** attempt)
        saved = "the judgments made so far are saved: rerun later to send only the missing ones"
        if problem.startswith("cannot connect"):
            raise ConfigError("judge.base_url", f"{self.url}: {problem} on all {self.cfg.max_retries + 1} tries",
                              "check its host and scheme (http or https), and HTTP(S)_PROXY, NO_PROXY and "
                              f"SSL_CERT_FILE in the environment; {saved}")
        raise ConfigError("judge.max_retries", f"{self.url}: {problem} on all {self.cfg.max_retries + 1} tries",
                          f"{saved}, or raise judge.max_retries")

    async def _try(self, body: dict) -> tuple[Reply | str, float | None]:
        """One request: (the reply, None), or (why it failed, seconds to wait) when retrying
        can help. Raises ConfigError when it cannot."""
        try:
            # The whole request, not just each read: a server dripping a byte at a time never
            # lets a read time out.
            answer = await asyncio.wait_for(self._post(body), self.cfg.timeout_s)
        except (httpx.TimeoutException, TimeoutError):
            return f"no answer within judge.timeout_s={self.cfg.timeout_s:g}s", None
        except httpx.TransportError as exc:  # DNS, TLS, refused, proxy: the cause tells a typo from an outage
            return f"cannot connect ({type(exc).__name__}: {_cause(exc)})", None
        except httpx.DecodingError as exc:  # a body its Content-Encoding does not describe
            raise ConfigError("judge.base_url", f"{self.url} sent a body that cannot be decoded ({_cause(exc)})",
                              "point it at an OpenAI-compatible chat-completions server") from None
        if answer.status == 200:
            return _reply(answer, self.url), None
        if answer.status == 429 or answer.status >= 500:
            return f"HTTP {answer.status}", _retry_after(answer)
        if answer.status == 400 and _context_too_long(answer):
            return Reply(ERROR_JUDGMENT, 0, 0, 0, CONTEXT_TOO_LONG, _snippet(answer)), None
        raise _refusal(answer, self.url)

    async def _post(self, body: dict) -> Answer:
        """POST `body` and read the answer as it streams in, refusing one past MAX_REPLY_BYTES
        (a hostile or broken server could send gigabytes, which would land in calls.jsonl)."""
        chunks, size = [], 0
        async with self._http.stream("POST", self.url, json=body, headers=self._headers) as response:
            async for chunk in response.aiter_bytes():  # decompressed: a gzip bomb stops here too
                size += len(chunk)
                if size > MAX_REPLY_BYTES:
                    raise ConfigError("judge.base_url", f"{self.url} sent a reply longer than {MAX_REPLY_BYTES} "
                                      "bytes, far past any judgment", "point it at an OpenAI-compatible "
                                      "chat-completions server")
                chunks.append(chunk)
        text = b"".join(chunks).decode("utf-8", errors="replace")  # JSON is UTF-8 (RFC 8259)
        for form in self._key_forms:
            text = text.replace(form, REDACTED)
        return Answer(response.status_code, text, response.headers.get("retry-after", ""))


def _cause(exc: BaseException) -> str:
    """The first non-empty message along the exception's causes (httpx wraps httpcore's,
    which wraps the socket's or ssl's)."""
    while exc is not None:
        if str(exc):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return "no detail"


def _json(text: str) -> Any:
    """The JSON value of a reply; None when it is none (or nests deeper than the parser goes)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _context_too_long(answer: Answer) -> bool:
    """This request's prompt (plus max_tokens) exceeds the judge's context: OpenAI's error code
    (`{"error": {"code": "context_length_exceeded"}}`, also `orlhf serve`'s), or vLLM's
    message ("This model's maximum context length is ...", its code being 400)."""
    data = _json(answer.text)
    error = data.get("error", data) if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return False
    return error.get("code") == CONTEXT_TOO_LONG or "maximum context length" in str(error.get("message"))


def _reply(answer: Answer, url: str) -> Reply:
    data = _json(answer.text)
    try:
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = ...  # not an OpenAI reply at all
    if content is None:  # well formed, but the judge wrote no text
        why = {k: choice.get(k) or choice["message"].get(k) for k in ("finish_reason", "refusal")}
        detail = ", ".join(f"{k}={v!r}" for k, v in why.items() if v) or "content null"
        return Reply(ERROR_JUDGMENT, 0, *_usage(data), NO_CONTENT, detail[:SNIPPET])
    if not isinstance(content, str):
        raise ConfigError("judge.base_url", f"{url} answered without choices[0].message.content "
                          f"({_snippet(answer)})", "point it at an OpenAI-compatible chat-completions server")
    return Reply(content, 0, *_usage(data))


def _usage(data: dict) -> tuple[int, int]:
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def _count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _retry_after(answer: Answer) -> float | None:
    try:
        seconds = float(answer.retry_after)
    except ValueError:
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S) if seconds == seconds else None


def _refusal(answer: Answer, url: str) -> ConfigError:
    code, snippet = answer.status, _snippet(answer)
    if code in (401, 403):
        key, fix = "judge.api_key_env", "name the variable holding a valid key"
    elif code in (404, 405):
        key, fix = "judge.base_url", "check judge.base_url (it ends before /chat/completions) and judge.model"
    elif "max_tokens" in answer.text or "context" in answer.text:
        key, fix = "judge.max_tokens", "the prompt plus judge.max_tokens must fit the judge's context: lower it, " \
            "or use a judge with a longer context"
    else:
        key, fix = "judge.model", "check judge.model and the endpoint's limits"
    return ConfigError(key, f"{url} answered HTTP {code}: {snippet}", fix)


def _snippet(answer: Answer) -> str:
    return " ".join(answer.text.split())[:SNIPPET] or "empty body"
