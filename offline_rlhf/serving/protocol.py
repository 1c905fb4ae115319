"""The OpenAI request and answer shapes `orlhf serve` speaks, checked strictly: a field of
the wrong type, out of range, unknown, or an OpenAI feature this server does not have
(penalties, logprobs, tools, stored completions) set to anything but its default is an
APIError (HTTP 4xx in OpenAI's error shape), never silently ignored. No torch here.

Chat: `system` (or `developer`) messages may only open the conversation; their texts,
joined by blank lines, are one system turn, which a chat template renders as its system
message (in place of the `template.system` the model was trained with) and the paper's
template, which has no system role, prepends to the first user message
(`{system}\\n\\n{user}`). The other messages must alternate user, assistant, ..., user.
A message's `name` is refused: OpenAI shows it to the model, and the template has no place for it.
`chat_template_kwargs` (vLLM's extension) sets chat-template variables for the request.
"""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import MIN_TEMPERATURE, template_kwargs
from offline_rlhf.data.template import ASSISTANT, SYSTEM, USER, Turn

MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 200  # a stop string's tail is decoded at every step: keep it short
SEED_MODULUS = 2**32  # seeds key the sampling streams modulo this
SYSTEM_ROLES = ("system", "developer")
ECHO_CHARS = 40  # an error quotes a refused value up to this many characters
# OpenAI fields this server accepts only at their default (the values that change nothing).
DEFAULT_ONLY = {"frequency_penalty": (0, None), "presence_penalty": (0, None), "logprobs": (False, None),
                "top_logprobs": (0, None), "logit_bias": (None,), "echo": (False, None), "suffix": (None, ""),
                "best_of": (1, None), "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None,),
                "tools": (None, []), "tool_choice": (None, "none"), "store": (False, None), "metadata": (None, {})}
COMMON_FIELDS = {"model", "temperature", "top_p", "n", "max_tokens", "stop", "seed", "user", "stream",
                 "stream_options"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "chat_template_kwargs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}


class APIError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI's error `kind` and `code`, and the
    request field at fault (`param`)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


@dataclass(frozen=True)
class Limits:
    max_n: int
    max_prompts: int


@dataclass(frozen=True)
class Sampling:
    """What a request asks of the engine. A temperature below MIN_TEMPERATURE (0 included) is
    greedy decoding, as in vLLM: sampling there is argmax decoding in all but name."""

    temperature: float
    top_p: float
    n: int
    max_tokens: int | None  # None: the server's default, within the room the prompt leaves
    stop: tuple[str, ...]
    seed: int  # keys the sampling streams; drawn at random when the request names none

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


@dataclass(frozen=True)
class Streaming:
    """`stream` and `stream_options`: whether the answer comes as server-sent events, and
    whether a last event then carries the usage."""

    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class ChatRequest:
    model: str
    turns: list[Turn]  # alternating user/assistant, ending with user, after an optional system turn
    sampling: Sampling
    streaming: Streaming
    # Variables for the model's chat template over the ones it was trained with (vLLM's
    # chat_template_kwargs: Qwen3's {"enable_thinking": true})
    template_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[str]
    sampling: Sampling
    streaming: Streaming


def parse_body(body: bytes) -> dict:
    """The request's JSON object; NaN and Infinity are refused (they are not JSON)."""
    try:
        value = json.loads(body, parse_constant=_no_constants)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, and an integer over Python's 4300 digits
        raise APIError(f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise APIError("the body nests too deeply") from None
    if not isinstance(value, dict):
        raise APIError(f"the body must be a JSON object, got {type(value).__name__}")
    try:  # a \ud800 escape parses to a lone surrogate, which no tokenizer takes
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise APIError("the body holds an unpaired UTF-16 surrogate escape (not text)") from None
    return value


def _no_constants(name: str):
    raise APIError(f"the body holds {name}, which is not a JSON number")


def parse_chat(body: dict, limits: Limits) -> ChatRequest:
    check_fields(body, CHAT_FIELDS)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise APIError("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    budget = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return ChatRequest(model_of(body), chat_turns(required(body, "messages", list)), sampling(body, limits, budget),
                       streaming(body), chat_template_kwargs(body))


def chat_template_kwargs(body: dict) -> dict:
    """The request's chat_template_kwargs: a JSON object of Jinja variable names, none of
    those the renderer sets itself (`template_kwargs`, as template.kwargs is checked)."""
    if body.get("chat_template_kwargs") is None:
        return {}
    try:
        return template_kwargs(body["chat_template_kwargs"], "chat_template_kwargs")
    except ConfigError as error:
        raise APIError(str(error), param=error.key) from None


def parse_completion(body: dict, limits: Limits) -> CompletionRequest:
    check_fields(body, COMPLETION_FIELDS)
    prompt = required(body, "prompt", (str, list))
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError("prompt must be a string or a non-empty list of strings (token ids are not accepted)",
                       param="prompt")
    if len(prompts) > limits.max_prompts:
        raise APIError(f"at most {limits.max_prompts} prompts per request, got {len(prompts)}", param="prompt")
    return CompletionRequest(model_of(body), prompts, sampling(body, limits, "max_tokens"), streaming(body))


def check_fields(body: dict, allowed: set[str]) -> None:
    for key, value in body.items():
        if key in DEFAULT_ONLY:
            if not any(is_default(value, ok) for ok in DEFAULT_ONLY[key]):
                raise APIError(f"{key} is not supported by this server (leave it out); got {echo(value)}",
                               param=key, code="unsupported_parameter")
        elif key not in allowed:
            raise APIError(f"unknown field {key!r}", param=key, code="unknown_parameter")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError("user must be a string", param="user")


def echo(value) -> str:
    """A refused value as JSON, cut to ECHO_CHARS, so the reason before it stays readable."""
    text = json.dumps(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "..."


def is_default(value, default) -> bool:
    """`value` is `default` (0 and 0.0 alike; False is not 0 here)."""
    if default is None or isinstance(default, bool):
        return value is default
    if isinstance(default, int):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == default
    return value == default


def required(body: dict, key: str, kind: type | tuple[type, ...]):
    if body.get(key) is None:
        raise APIError(f"{key} is required", param=key, code="missing_required_parameter")
    return typed(body, key, kind)


def typed(body: dict, key: str, kind: type | tuple[type, ...]):
    """body[key] when it is of `kind` (a bool is not a number here)."""
    value = body[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise APIError(f"{key} must be of type {names}, got {type(value).__name__} {echo(value)}",
                       param=key, code="invalid_type")
    return value


def optional(body: dict, key: str, kind, default, low=None, high=None):
    """body[key] (absent or null: default), checked to lie in [low, high]."""
    if body.get(key) is None:
        return default
    value = typed(body, key, kind)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(f"{key} must be finite", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(f"{key} must be in [{low}, {high if high is not None else 'inf'}], got {value}", param=key,
                       code="invalid_value")
    return value


def model_of(body: dict) -> str:
    return required(body, "model", str)


def sampling(body: dict, limits: Limits, budget_key: str) -> Sampling:
    top_p = optional(body, "top_p", (int, float), 1.0, 0, 1)
    if top_p == 0:
        raise APIError("top_p must be > 0 (use temperature=0 for greedy decoding)", param="top_p")
    seed = optional(body, "seed", int, None)
    return Sampling(temperature=float(optional(body, "temperature", (int, float), 1.0, 0, 2)), top_p=float(top_p),
                    n=optional(body, "n", int, 1, 1, limits.max_n),
                    max_tokens=optional(body, budget_key, int, None, 1), stop=stops(body),
                    seed=secrets.randbelow(SEED_MODULUS) if seed is None else seed % SEED_MODULUS)


def streaming(body: dict) -> Streaming:
    """stream_options is only meaningful for a streamed answer (OpenAI refuses it otherwise)."""
    stream = optional(body, "stream", bool, False)
    if body.get("stream_options") is None:
        return Streaming(stream)
    options = typed(body, "stream_options", dict)
    if not stream:
        raise APIError("stream_options is only allowed with stream=true", param="stream_options")
    unknown = set(options) - {"include_usage"}
    if unknown:
        raise APIError(f"stream_options has unknown field(s) {sorted(unknown)}", param="stream_options",
                       code="unknown_parameter")
    return Streaming(stream, optional(options, "include_usage", bool, False))


def stops(body: dict) -> tuple[str, ...]:
    if body.get("stop") is None:
        return ()
    value = typed(body, "stop", (str, list))
    listed = [value] if isinstance(value, str) else value
    if len(listed) > MAX_STOPS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in listed):
        raise APIError(f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings of at most "
                       f"{MAX_STOP_CHARS} characters", param="stop")
    return tuple(dict.fromkeys(listed))


def chat_turns(messages: list) -> list[Turn]:
    """OpenAI messages -> alternating (role, text) turns after one system turn holding the
    system texts, if any (see the module docstring). Alternation is the template's to check."""
    system, turns = [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(f"{where} must be an object with a string role", param=where)
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise APIError(f"{where} has unknown field(s) {sorted(unknown)}", param=where)
        if message.get("name") is not None:  # OpenAI shows it to the model; the template has no place for it
            raise APIError(f"{where}.name is not supported by this server (the template has no participant "
                           "names; leave it out)", param=f"{where}.name", code="unsupported_parameter")
        role, text = message["role"], content_text(message.get("content"), where)
        if role in SYSTEM_ROLES:
            if turns:
                raise APIError(f"{where}: a {role} message may only open the conversation", param=where)
            if text.strip():  # an empty one says nothing (OpenAI takes it)
                system.append(text.strip())
        elif role in (USER, ASSISTANT):
            turns.append((role, text))
        else:
            raise APIError(f"{where}: unsupported role {role!r} (system, user, assistant)", param=where)
    return ([(SYSTEM, "\n\n".join(system))] if system else []) + turns


def content_text(content, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise APIError(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


# --- answers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    tokens: int  # generated tokens, the EOS included


def answer_head(model: str, kind: str) -> dict:
    """The fields an answer opens with (`kind` is its object): a streamed answer's chunks
    all share one head."""
    prefix = "chatcmpl" if kind.startswith("chat.") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model,
            "system_fingerprint": None}


def chat_answer(model: str, choices: list[Choice], prompt_tokens: int) -> dict:
    return {**answer_head(model, "chat.completion"), "usage": usage(prompt_tokens, choices),
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                         "finish_reason": c.finish_reason} for i, c in enumerate(choices)]}


def completion_answer(model: str, choices: list[Choice], prompt_tokens: int) -> dict:
    return {**answer_head(model, "text_completion"), "usage": usage(prompt_tokens, choices),
            "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                        for i, c in enumerate(choices)]}


def chat_chunk(head: dict, index: int, delta: dict, finish_reason: str | None) -> dict:
    """One event of a streamed chat answer: choice `index`'s next piece (`delta`: the role
    first, then {"content": text}); finish_reason is set on the choice's last chunk."""
    return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion_chunk(head: dict, index: int, text: str, finish_reason: str | None) -> dict:
    return {**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(head: dict, prompt_tokens: int, choices: list[Choice]) -> dict:
    """A streamed answer's last event when stream_options.include_usage: no choices, the usage."""
    return {**head, "choices": [], "usage": usage(prompt_tokens, choices)}


def stream_error(message: str) -> dict:
    """An event that ends a stream whose batch failed after it began (the status was sent)."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def openai_finish(finish: str) -> str:
    """OpenAI's finish_reason for the engine's: its "eos" and "stop" are both a natural stop."""
    return "length" if finish == "length" else "stop"


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def models_answer(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "orlhf"}]}
