"""The OpenAI-compatible HTTP side of `orlhf serve` (Starlette, run by uvicorn in a thread).

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models` (and
`/v1/models/{id}`) and `GET /health` (the only one open without the API key). Each
completion request is checked (protocol.py), its prompts are tokenized (off the event
loop: a large prompt does not stall other streams) and measured against the model's
max_seq_len here, and it is queued as one Job for the engine thread (batcher.py); the
answer is decoded here once the job ran, or, streamed (`stream: true`), told as its tokens
come (stream.py). Errors are JSON in OpenAI's shape: 400 a bad request, 401 a missing or
wrong key, 404 an unknown model or route, 413 a body over the cap, 415 a POST body not
declared JSON, 500 a failed batch (the server goes on; the answer names an error id, the
log has the details under it), 503 shutting down. Without an API key the server answers
only requests naming a loopback Host (400 otherwise), and the 415 also applies with one:
together they keep a web page the user visits from driving it (see `_refusal`). A
streamed request gets these too, up to its batch's first token; a batch that fails after
that ends its stream with an error event. A client that disconnects gives its request
up: queued, it never runs; running, its rows end at the engine's next cancellation poll
and free their slots.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from offline_rlhf.config.serving import ServeConfig, is_loopback
from offline_rlhf.data.chat_template import ChatFormat
from offline_rlhf.generation.engine import Completion, answer_text, cut_at_stop
from offline_rlhf.http import authorized, bearer, internal_error, json_error, read_capped_body
from offline_rlhf.serving.batcher import Batcher, Job, ServerStopping
from offline_rlhf.serving.model import ServedModel
from offline_rlhf.serving.protocol import (
    APIError,
    Choice,
    Limits,
    Sampling,
    Streaming,
    answer_head,
    chat_answer,
    completion_answer,
    models_answer,
    openai_finish,
    parse_body,
    parse_chat,
    parse_completion,
)
from offline_rlhf.serving.stream import StreamedAnswer, TextDeltas, TokenEvents

Endpoint = Callable[[Request], Awaitable[Response]]
log = logging.getLogger(__name__)
CLIENT_CLOSED = 499  # nginx's status for a request its client gave up (nobody receives it)
JSON = "application/json"  # the one media type a POST body may have


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class OpenAIServer:
    def __init__(self, served: ServedModel, batcher: Batcher, cfg: ServeConfig, api_key: str | None):
        self.served, self.batcher, self.cfg = served, batcher, cfg
        self.limits = Limits(max_n=cfg.max_n, max_prompts=cfg.max_prompts)
        self._expected = bearer(api_key) if api_key else None
        self.created = int(time.time())

    def app(self) -> Starlette:
        guarded = [Route("/v1/chat/completions", self._guard(self.chat), methods=["POST"]),
                   Route("/v1/completions", self._guard(self.completions), methods=["POST"]),
                   Route("/v1/models", self._guard(self.models), methods=["GET"]),
                   Route("/v1/models/{model:path}", self._guard(self.model), methods=["GET"])]
        return Starlette(routes=[Route("/health", self._guard(self.health, keyed=False), methods=["GET"]), *guarded],
                         exception_handlers={HTTPException: no_route})

    def _guard(self, endpoint: Endpoint, keyed: bool = True) -> Endpoint:
        """The checks of `_refusal` first (the key's when `keyed`), and APIError raised
        anywhere below as its JSON answer; any other exception is a 500 that names an error
        id, not the exception, whose text may tell a client about the server."""
        async def guarded(request: Request) -> Response:
            refused = self._refusal(request, keyed)
            if refused is not None:
                return refused
            try:
                return await endpoint(request)
            except ClientGone:
                return Response(status_code=CLIENT_CLOSED)
            except APIError as error:
                return json_error(error.status, str(error), error.kind, error.param, error.code)
            except Exception as error:  # noqa: BLE001 - a failed batch or a bug: this request's 500, not the server's end
                return json_error(500, internal_error(log, f"{request.method} {request.url.path}", error),
                                  "server_error")
        return guarded

    def _refusal(self, request: Request, keyed: bool) -> Response | None:
        """The answer to a request refused before its handler runs, None if it is not. A web
        page the user visits can send requests to a server on the user's machine: a keyless
        one checks the Host, which names the page's site even after DNS rebinding points
        that name at 127.0.0.1, and no POST is taken unless its body is declared JSON, which
        a browser sends cross-site only after a CORS preflight that this server does not
        answer (text/plain, form and multipart bodies are sent without asking)."""
        if self._expected is None and not loopback_host(request.headers.get("host", "")):
            return json_error(400, f"Host {request.headers.get('host', '')!r} is not a loopback name: a server without "
                              "an API key answers only requests to 127.0.0.1, localhost or [::1]", code="invalid_host")
        if keyed and self._expected is not None and not authorized(request, self._expected):
            return json_error(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and content_type.partition(";")[0].strip().lower() != JSON:
            return json_error(415, f"the body must be JSON, sent with Content-Type: {JSON} (got {content_type!r})",
                              code="unsupported_media_type")
        return None

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.served.name, "ready": self.batcher.serving.is_set()})

    async def models(self, request: Request) -> Response:
        return JSONResponse(models_answer(self.served.name, self.created))

    async def model(self, request: Request) -> Response:
        self._check_model(request.path_params["model"])
        [model] = models_answer(self.served.name, self.created)["data"]
        return JSONResponse(model)

    async def chat(self, request: Request) -> Response:
        parsed = parse_chat(await self._body(request), self.limits)
        self._check_model(parsed.model)
        if parsed.template_kwargs and not isinstance(self.served.template, ChatFormat):
            raise APIError("chat_template_kwargs: this model's template is the paper's format (User: ... "
                           "Assistant:), which has no variables; leave it out", param="chat_template_kwargs")
        try:
            prompt = await asyncio.to_thread(self.served.chat_prompt, parsed.turns, parsed.template_kwargs)
        except ValueError as error:  # the template's alternation check
            raise APIError(str(error), param="messages") from None
        if parsed.streaming.stream:
            return await self._stream(request, [prompt], parsed.sampling, parsed.streaming, chat=True)
        [completions] = await self._generate(request, [prompt], parsed.sampling, chat=True)
        decode, stop = self.served.tokenizer.decode, parsed.sampling.stop
        choices = [Choice(answer_text(c, decode, stop), openai_finish(c.finish), len(c.tokens)) for c in completions]
        return JSONResponse(chat_answer(self.served.name, choices, len(prompt)))

    async def completions(self, request: Request) -> Response:
        parsed = parse_completion(await self._body(request), self.limits)
        self._check_model(parsed.model)
        prompts = await asyncio.to_thread(lambda: [self.served.tokenizer.encode(text) for text in parsed.prompts])
        if parsed.streaming.stream:
            return await self._stream(request, prompts, parsed.sampling, parsed.streaming, chat=False)
        answered = await self._generate(request, prompts, parsed.sampling, chat=False)
        decode, stop = self.served.tokenizer.decode, parsed.sampling.stop
        choices = [Choice(completion_text(c, decode, stop), openai_finish(c.finish), len(c.tokens))
                   for completions in answered for c in completions]
        return JSONResponse(completion_answer(self.served.name, choices, sum(map(len, prompts))))

    async def _body(self, request: Request) -> dict:
        body = await read_capped_body(request, self.cfg.max_body_kb * 1024)
        if body is None:
            raise APIError(f"the request body is over {self.cfg.max_body_kb} KiB", status=413,
                           code="request_too_large")
        return parse_body(body)

    def _check_model(self, model: str) -> None:
        if model != self.served.name:
            raise APIError(f"the model {model!r} does not exist; this server serves {self.served.name!r}", status=404,
                           param="model", code="model_not_found")

    async def _generate(self, request: Request, prompts: list[list[int]], sampling: Sampling, chat: bool
                        ) -> list[list[Completion]]:
        """Queue the prompts as one job and wait for the engine thread to run it."""
        job = self._job(prompts, sampling, chat)
        with unavailable_when_stopping():
            return await while_connected(request, job, asyncio.wrap_future(self.batcher.submit(job)))

    async def _stream(self, request: Request, prompts: list[list[int]], sampling: Sampling, streaming: Streaming,
                      chat: bool) -> Response:
        """Queue the prompts as one streaming job and answer with its events once its first
        token came (what fails before that is an ordinary error answer). The stream ending
        early (the client left) closes `events`, which gives the job up."""
        events = TokenEvents(asyncio.get_running_loop())
        job = self._job(prompts, sampling, chat, events)
        try:
            with unavailable_when_stopping():
                self.batcher.submit(job).add_done_callback(events.job_done)
                first = await while_connected(request, job, events.next())
                if isinstance(first[0], Future):
                    first[0].result()  # the batch failed (or the server stopped) before the job's first token
        except BaseException:
            events.close()
            job.future.cancel()  # if no batch took it yet
            raise
        decode, stop = self.served.tokenizer.decode, sampling.stop
        text = answer_text if chat else completion_text
        texts = [TextDeltas(lambda c: text(c, decode, stop), stop, decode) for _ in range(job.row_count())]
        head = answer_head(self.served.name, "chat.completion.chunk" if chat else "text_completion")
        answer = StreamedAnswer(head, texts, chat, sum(map(len, prompts)) if streaming.include_usage else None)
        return StreamingResponse(answer.body(events, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _job(self, prompts: list[list[int]], sampling: Sampling, chat: bool, events: TokenEvents | None = None) -> Job:
        budgets = [self._budget(p, sampling, i, chat) for i, p in enumerate(prompts)]
        if events is None:
            return Job(prompts, budgets, sampling)
        return Job(prompts, budgets, sampling, on_token=events, gone=events.gone)

    def _budget(self, prompt: list[int], sampling: Sampling, index: int, chat: bool) -> int:
        """New tokens for one prompt: max_tokens, else the server default, within the room
        the prompt leaves in the model's max_seq_len. A prompt that leaves no room is the
        messages' (or the prompt's) fault, a budget past the room max_tokens'."""
        if not prompt:
            raise APIError(f"prompt {index} is empty", param="prompt")
        room, context = self.served.max_seq_len - len(prompt), self.served.max_seq_len
        size = f"the messages have {len(prompt)} tokens" if chat else f"prompt {index} has {len(prompt)} tokens"
        if room < 1:
            raise APIError(f"{size}, the model's context is {context} tokens", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        if sampling.max_tokens is None:
            return min(self.cfg.max_tokens, room)
        if sampling.max_tokens > room:
            raise APIError(f"{size} + max_tokens={sampling.max_tokens}; the model's context is {context} tokens",
                           param="max_tokens", code="context_length_exceeded")
        return sampling.max_tokens


async def while_connected(request: Request, job: Job, answer: Awaitable):
    """`answer`'s result, unless the client disconnects first: then the job is given up
    (`Job.gone`; a queued job's future is cancelled, so no batch takes it) and ClientGone
    is raised."""
    answer, gone = asyncio.ensure_future(answer), asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not answer.done():
        job.gone.set()
        job.future.cancel()
        answer.cancel()
        raise ClientGone
    return answer.result()


async def disconnected(request: Request) -> None:
    """Returns when the client disconnects (its body has been read: the server's next
    message for this request can only be the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@contextmanager
def unavailable_when_stopping() -> Iterator[None]:
    """A job the server refused or dropped because it is stopping: HTTP 503."""
    try:
        yield
    except ServerStopping as error:
        raise APIError(str(error), status=503, kind="server_error", code="shutting_down") from None


def completion_text(completion: Completion, decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> str:
    """A raw continuation: without its EOS and anything from a stop string on, not stripped
    (unlike chat answers, where the template's separator precedes the answer)."""
    tokens = completion.tokens[:-1] if completion.finish == "eos" else completion.tokens
    return cut_at_stop(decode(tokens), stop)


def loopback_host(host: str) -> bool:
    """Whether a Host header names this machine by a loopback name: localhost, 127.x.x.x
    or [::1], with or without a port."""
    name = host.lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif ":" in name:
        name = name.rpartition(":")[0]
    return is_loopback(name)


async def no_route(request: Request, error: HTTPException) -> Response:
    return json_error(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                      code="not_found" if error.status_code == 404 else None)
