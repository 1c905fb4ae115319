"""The HTTP layer of the PPO modules (actor, critic, initial policy, reward model).

A Service serves `POST /<endpoint>` (a wire.py payload in, one out), `GET /health` and
`POST /shutdown` with Starlette on uvicorn. Every request but /health must carry
`Authorization: Bearer <token>` (the shared secret of write_token); bodies over
`max_body_bytes` are refused with 413 before they are read whole. Status codes: 401 bad
token, 404 unknown endpoint, 413 too large, 400 payload or handler ValueError (WireError
is one; a float that is NaN or infinite in a request is one too), 500 any other handler
exception (the service keeps serving): a ConfigError (the service's model or settings at
fault, not the request) and a NaN or infinite number in the answer (NonFiniteAnswer)
included, 503 stopping.

The client sends the token only to a peer that has proved it holds it. On Slurm a service
listens on a port anyone can predict (ppo_baseline.serve.service_port), and until it has
loaded its weights anything else may listen there. So `GET /health?nonce=N` carries no
token and the service answers `proof`, HMAC-SHA256 under the token of its name and N
(`health_proof`); the Client checks it just before each authenticated request (which then
reuses that kept-alive connection), not once, since a service that dies frees its port.
/health tells nothing else but the service's name and whether it is ready.

Threads: uvicorn runs in a background thread and only authenticates, caps and queues each
request as a Call; the thread that calls `serve()` (the main thread) takes the calls one at
a time and runs `execute(endpoint, body)`: decode, handler, encode. This is the seam for a
torchrun world: rank 0 runs the server and `serve()`, and broadcasts each Call's endpoint
and body bytes so that every rank runs `execute` on the same request (a collective forward
pass); only rank 0's answer goes back over HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import queue
import re
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import httpx
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.http import authorized, bearer, http_url, listen, one_line, read_capped_body
from offline_rlhf.http import read_token as read_token  # re-exported: the PPO launcher and tests use it here
from offline_rlhf.http import write_token as write_token
from ppo_baseline.wire import Payload, Schema, WireError, decode, encode

Handler = Callable[[Payload], Payload]

OCTET_STREAM = "application/octet-stream"
DEFAULT_MAX_BODY_BYTES = 256 * 2**20  # a rollout batch of 1024 x 2048 tokens is ~16 MiB per tensor
RESERVED = {"health", "shutdown"}
ENDPOINT_NAME = re.compile(r"[A-Za-z0-9_-]+")
NONCE = re.compile(r"[A-Za-z0-9_-]{16,128}")  # a /health challenge: what secrets.token_hex writes, bounded
log = logging.getLogger(__name__)


class ServiceStopping(RuntimeError):
    """The service shut down before running a queued call (HTTP 503)."""


class ServiceError(RuntimeError):
    """A client call that failed; the message names the service, its URL and the endpoint."""


class NotOurService(ServiceError):
    """What answered /health at a service's address did not prove that it holds the token."""


class NonFiniteAnswer(ArithmeticError):
    """The service computed a NaN or infinite number (HTTP 500): its model or its training
    diverged; passing it on would poison the PPO update silently."""


def health_proof(token: str, name: str, nonce: str) -> str:
    """What service `name` answers to /health?nonce=`nonce`: HMAC-SHA256 under the shared
    token, hex. The name is in it so that the answer of one service of the run, relayed,
    does not pass for another's."""
    return hmac.new(token.encode(), f"{name}:{nonce}".encode(), hashlib.sha256).hexdigest()


def non_finite(payload: Payload) -> list[str]:
    """The tensors and metadata keys of `payload` holding a float that is NaN or infinite."""
    tensors = [f"tensor {name!r}" for name, value in payload.tensors.items()
               if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    meta = [f"metadata {key!r}" for key, value in payload.meta.items()
            if isinstance(value, float) and not math.isfinite(value)]
    return tensors + meta


# --- the server ----------------------------------------------------------------------


@dataclass
class Call:
    """One queued request: the endpoint and its raw body; `future` receives the encoded
    answer or the exception that `execute` raised."""

    endpoint: str
    body: bytes
    future: Future = field(default_factory=Future)


class Service:
    """One PPO module's HTTP service. `route()` the endpoints, then
        with Service("critic", token, port=0) as service:   # starts the HTTP thread
            service.serve()                                  # until POST /shutdown
    port 0 picks a free port; `service.port` and `service.url` report it once started."""

    def __init__(self, name: str, token: str, *, host: str = "127.0.0.1", port: int = 0,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        if not token:
            raise ValueError("a service needs a non-empty token")
        self.name, self.host, self.port = name, host, port
        self.max_body_bytes = max_body_bytes
        self.step = 0  # the training steps taken, logged at exit; the owner updates it after each
        self.routes: dict[str, tuple[Handler, Schema]] = {}
        self._token = token
        self._expected = bearer(token)
        self._calls: queue.Queue[Call] = queue.Queue()
        self._stopping = threading.Event()
        self._serving = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    def route(self, endpoint: str, handler: Handler, schema: Schema) -> None:
        """Serve `POST /<endpoint>`: bodies are decoded against `schema`, then `handler`."""
        if not ENDPOINT_NAME.fullmatch(endpoint) or endpoint in RESERVED:
            raise ValueError(f"invalid endpoint name {endpoint!r} for service {self.name}")
        self.routes[endpoint] = (handler, schema)

    # Lifecycle: start the HTTP thread, serve calls on this thread, stop.

    def start(self, timeout_s: float = 30.0) -> Service:
        """Bind host:port (reporting the port picked for 0) and start uvicorn in a thread."""
        listening = listen(self._app(), self.host, self.port, f"{self.name} service", timeout_s)
        self.port, self._server, self._thread = listening.port, listening.server, listening.thread
        return self

    def serve(self, poll_s: float = 0.1) -> None:
        """Run queued calls on this thread until shutdown (POST /shutdown or stop())."""
        self._serving.set()
        try:
            while not self._stopping.is_set():
                try:
                    call = self._calls.get(timeout=poll_s)
                except queue.Empty:
                    continue
                self._run(call)
        finally:
            self._serving.clear()
            self._fail_pending()

    def execute(self, endpoint: str, body: bytes) -> bytes:
        """What every rank runs per request: decode against the endpoint's schema, call
        its handler, encode the answer. Raises WireError for a bad payload, ValueError for a
        NaN or infinite float in it, NonFiniteAnswer for one in the answer."""
        handler, schema = self.routes[endpoint]
        request = decode(body, schema)
        if bad := non_finite(request):
            raise ValueError(f"NaN or infinite values in the request's {', '.join(bad)}")
        answer = handler(request)
        if bad := non_finite(answer):
            raise NonFiniteAnswer(f"{self.name} /{endpoint} computed NaN or infinite values in its answer's "
                                  f"{', '.join(bad)}")
        return encode(answer)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and the HTTP thread; queued calls are answered 503."""
        self._begin_stop()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _begin_stop(self) -> None:
        # Queued calls are failed before uvicorn is told to exit: its graceful shutdown
        # waits for open requests, which would otherwise wait for a serve() that has ended.
        self._stopping.set()
        self._fail_pending()
        if self._server is not None:
            self._server.should_exit = True

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, call: Call) -> None:
        # A call whose client went away was cancelled by the HTTP thread: skip it.
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(self.execute(call.endpoint, call.body))
        except Exception as error:
            if not isinstance(error, ValueError) or isinstance(error, ConfigError):
                log.error("%s /%s failed", self.name, call.endpoint, exc_info=error)
            call.future.set_exception(error)

    def _fail_pending(self) -> None:
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            if call.future.set_running_or_notify_cancel():
                call.future.set_exception(ServiceStopping(f"{self.name} service is shutting down"))

    # The ASGI side, run by uvicorn's thread.

    def _app(self) -> Starlette:
        return Starlette(routes=[Route("/health", self._health, methods=["GET"]),
                                 Route("/shutdown", self._shutdown, methods=["POST"]),
                                 Route("/{endpoint}", self._call, methods=["POST"])])

    def _authorized(self, request: Request) -> bool:
        return authorized(request, self._expected)

    async def _health(self, request: Request) -> Response:
        """Open to all: the name, readiness and, for a nonce, the proof of the token."""
        answer = {"name": self.name, "ready": self._serving.is_set() and not self._stopping.is_set()}
        nonce = request.query_params.get("nonce")
        if nonce is not None:
            if not NONCE.fullmatch(nonce):
                return PlainTextResponse(f"nonce must match {NONCE.pattern}", status_code=400)
            answer["proof"] = health_proof(self._token, self.name, nonce)
        return JSONResponse(answer)

    async def _shutdown(self, request: Request) -> Response:
        if not self._authorized(request):
            return unauthorized()
        self._begin_stop()
        return JSONResponse({"stopping": True})

    async def _call(self, request: Request) -> Response:
        if not self._authorized(request):
            return unauthorized()
        endpoint = request.path_params["endpoint"]
        if endpoint not in self.routes:
            return PlainTextResponse(f"{self.name} has no endpoint /{endpoint}", status_code=404)
        body = await read_capped_body(request, self.max_body_bytes)
        if body is None:
            return PlainTextResponse(f"body over {self.max_body_bytes} bytes", status_code=413)
        if self._stopping.is_set():
            return PlainTextResponse(f"{self.name} service is shutting down", status_code=503)
        call = Call(endpoint, body)
        self._calls.put(call)
        return await answer(call)


async def answer(call: Call) -> Response:
    """Wait for the main thread to run `call` and map its outcome to a response."""
    try:
        return Response(await asyncio.wrap_future(call.future), media_type=OCTET_STREAM)
    except ConfigError as error:  # a ValueError, but of the service's own model or settings
        return PlainTextResponse(f"{type(error).__name__}: {one_line(error)}", status_code=500)
    except ValueError as error:  # WireError included: the request was at fault
        return PlainTextResponse(f"{type(error).__name__}: {one_line(error)}", status_code=400)
    except ServiceStopping as error:
        return PlainTextResponse(one_line(error), status_code=503)
    except Exception as error:
        return PlainTextResponse(f"{type(error).__name__}: {one_line(error)}", status_code=500)


def unauthorized() -> Response:
    return PlainTextResponse("missing or wrong bearer token", status_code=401,
                             headers={"WWW-Authenticate": "Bearer"})


# --- the client ----------------------------------------------------------------------


class Client:
    """Calls one Service. Connection failures and 502/503/504 are retried `retries` times
    with exponential backoff; a 500 is not, since it is the handler's own failure and the
    call (a training step) may not be safe to repeat. Failures raise ServiceError.

    The token goes only to a peer that proved it holds it: `health()` sends none and checks
    the answer's proof (NotOurService if it is wrong or missing); `call` and `shutdown` run
    that check just before each of their attempts. Proxy variables of the environment are
    ignored: the token goes to the service only."""

    def __init__(self, name: str, url: str, token: str, *, timeout_s: float = 600.0, connect_timeout_s: float = 10.0,
                 retries: int = 3, backoff_s: float = 0.5, retry_statuses: tuple[int, ...] = (502, 503, 504)):
        self.name, self.url = name, url
        self.retries, self.backoff_s, self.retry_statuses = retries, backoff_s, retry_statuses
        self._token = token
        self._http = httpx.Client(base_url=url, timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
                                  trust_env=False)

    @property
    def address(self) -> str:
        return self._http.base_url.netloc.decode()

    def call(self, endpoint: str, payload: Payload, schema: Schema) -> Payload:
        """POST the payload to /<endpoint>; the answer is validated against `schema`."""
        response = self._request("POST", f"/{endpoint}", content=encode(payload),
                                 headers={"Content-Type": OCTET_STREAM}, authenticated=True)
        try:
            return decode(response.content, schema)
        except WireError as error:
            raise self._error(f"/{endpoint}", f"malformed answer: {error}") from None

    def health(self) -> dict:
        """GET /health with a fresh nonce and no token; the answer, once its proof checks."""
        nonce = secrets.token_hex(16)
        response = self._request("GET", "/health", params={"nonce": nonce})
        try:
            answer = response.json()
            proof = answer.get("proof", "") if isinstance(answer, dict) else ""
        except ValueError:  # not JSON
            proof = ""
        expected = health_proof(self._token, self.name, nonce)
        if not (isinstance(proof, str) and hmac.compare_digest(proof.encode(), expected.encode())):
            raise NotOurService(f"something else answers at {self.address}: not our {self.name} service (its "
                                f"/health did not prove it holds the run's token, so the token was not sent there)")
        return answer

    def shutdown(self) -> None:
        self._request("POST", "/shutdown", authenticated=True)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, authenticated: bool = False, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            if authenticated:
                self.health()
            token = {"Authorization": f"Bearer {self._token}"} if authenticated else {}
            try:
                response = self._http.request(method, path, headers={**headers, **token}, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                failure = f"cannot connect ({one_line(error)})"
                continue
            except httpx.HTTPError as error:
                raise self._error(path, f"{type(error).__name__}: {one_line(error)}") from None
            if response.is_success:
                return response
            failure = f"HTTP {response.status_code}: {one_line(response.text)}"
            if response.status_code not in self.retry_statuses:
                raise self._error(path, failure)
        raise self._error(path, f"{failure} after {self.retries + 1} attempts")

    def _error(self, path: str, message: str) -> ServiceError:
        return ServiceError(f"{self.name} service at {self.url}{path}: {message}")
