"""The HTTP pieces every service of the project shares (the PPO modules, `orlhf serve`):
the bearer secret and its file, an API key from the environment (also `orlhf judge`'s),
the request-size cap, the bearer check, error text on one line, JSON error answers, and
uvicorn started on an explicitly bound socket in a thread, with a deadline for a
request's headers and a cap on open connections.

Starlette on uvicorn; nothing here unpickles or evaluates what a client sends.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import resource
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from offline_rlhf.config.errors import ConfigError

ERROR_CHARS = 500  # error messages are one line, cut to this length
HEADER_TIMEOUT_S = 10.0  # a client must send a request's headers this soon after connecting, and after each answer
MAX_CONNECTIONS = 1000  # open connections per server at most (and at most half the open-file limit)
LOG_EVERY_S = 60.0  # a connection-level failure that repeats is logged at most once per this interval
MALFORMED_REQUEST = "Invalid HTTP request received."  # uvicorn's warning (h11), logged per request
log = logging.getLogger(__name__)


def one_line(value: object) -> str:
    """An error message as one line of at most ERROR_CHARS characters."""
    return " ".join(str(value).split())[:ERROR_CHARS]


# --- the shared secret ---------------------------------------------------------------


def write_token(path: str | Path) -> str:
    """Write a fresh random token to `path`, readable by its owner only (0600), and return
    it. The temporary file is created exclusively with that mode, so the token is never
    visible to others even for a moment, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(token + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return token


def read_token(path: str | Path) -> str:
    """The token in `path`; refuses a file that group or others may read, as ssh does with
    private keys, since anyone holding the token can drive the service."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"token file {path} has mode {mode:o}; it must be readable by its owner only (600)")
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def key_from_env(variable: str, key: str, fix: str) -> str | None:
    """The API key held in the environment variable `variable`, stripped (None when
    `variable` is "": no key). Unset, empty or only whitespace is a ConfigError on `key`,
    the setting that names the variable, with `fix`. Only the variable's name is ever
    configured or logged, never the key."""
    if not variable:
        return None
    value = os.environ.get(variable, "").strip()
    if not value:
        raise ConfigError(key, f"the environment variable {variable} is unset or empty (or only whitespace)", fix)
    return value


def bearer(token: str) -> bytes:
    """The Authorization header value that carries `token`."""
    return f"Bearer {token}".encode()


def authorized(request: Request, expected: bytes) -> bool:
    """Whether the request's Authorization header is `expected` (a `bearer` value): the
    scheme's case is free (RFC 7235: `bearer KEY` is `Bearer KEY`), the key is compared in
    constant time, so the time taken does not tell how much of a guess was right."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    supplied = bearer(key.lstrip(" ")) if scheme.lower() == "bearer" else b""
    return hmac.compare_digest(supplied, expected)


# --- requests and answers --------------------------------------------------------------


async def read_capped_body(request: Request, max_bytes: int) -> bytes | None:
    """The body, or None once it is over `max_bytes`: a declared Content-Length over it is
    refused unread, a chunked body as soon as the cap is passed."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def json_error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which
    OpenAI-compatible clients parse and show; the message is one line."""
    body = {"error": {"message": one_line(message), "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def internal_error(logger: logging.Logger, what: str, error: BaseException) -> str:
    """Log `error` with its traceback under a fresh id and return what the client is told
    instead: only the id, since an exception's text can tell a client about the server
    (paths, settings, other requests' data)."""
    incident = secrets.token_hex(6)
    logger.error("%s failed (error id %s)", what, incident, exc_info=error)
    return f"internal server error (error id {incident}; the server's log has the details)"


# --- the server thread -------------------------------------------------------------------


@dataclass
class Listening:
    """A uvicorn server answering on `host:port` from its own daemon thread."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen(app, host: str, port: int, name: str, timeout_s: float = 30.0, header_timeout_s: float = HEADER_TIMEOUT_S,
           max_connections: int = MAX_CONNECTIONS) -> Listening:
    """Bind exactly `host:port` (port 0 picks a free one, reported in the result) and run
    uvicorn on that socket in a daemon thread; returns once it accepts connections. A
    connection must send a request's headers within `header_timeout_s`, and at most
    `max_connections` are open (see GuardedH11)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    guard = Guard(name, header_timeout_s, min(max_connections, open_file_limit() // 2))
    # log_config=None: uvicorn's records go to the process's own logging setup instead of
    # handlers that uvicorn would install globally. ws="none": no route speaks WebSocket,
    # and an upgraded connection would leave GuardedH11's bookkeeping.
    config = uvicorn.Config(app, http=functools.partial(GuardedH11, guard=guard), ws="none", log_config=None,
                            log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    server = GuardedServer(config, guard)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"{name}-http", daemon=True)
    listening = Listening(server, thread, host, sock.getsockname()[1])
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            listening.stop()
            sock.close()
            raise RuntimeError(f"{name} did not start on {listening.url}")
        time.sleep(0.01)
    return listening


# --- slow and idle clients ---------------------------------------------------------------


def open_file_limit() -> int:
    """This process's soft limit on open files (each connection holds one)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Throttled:
    """A warning logged at most once per LOG_EVERY_S; the next one says how many were left out."""

    def __init__(self):
        self.next_at, self.left_out = 0.0, 0

    def warn(self, message: str, *args) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.left_out += 1
            return
        more = f" ({self.left_out} more like it since the last one not logged)" if self.left_out else ""
        log.warning(message + more, *args)
        self.next_at, self.left_out = now + LOG_EVERY_S, 0


@dataclass
class Guard:
    """One server's connection limits, and its throttled warnings about them."""

    name: str
    header_timeout_s: float
    max_connections: int
    refusals: Throttled = field(default_factory=Throttled)
    accept_failures: Throttled = field(default_factory=Throttled)
    malformed: Throttled = field(default_factory=Throttled)

    def loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The server loop's handler for errors outside any request. When the process is out
        of file descriptors, asyncio reports each failed accept (up to the listen backlog,
        2048, per retry, and schedules a retry for each): a review saw 135k tracebacks (54 MB)
        in two minutes. That one is throttled; any other goes to asyncio's own handler."""
        if context.get("message", "").startswith("socket.accept()"):
            self.accept_failures.warn("%s: cannot accept connections: %s", self.name, context.get("exception"))
        else:
            loop.default_exception_handler(context)


class GuardedServer(uvicorn.Server):
    """uvicorn's server with Guard.loop_error as its event loop's exception handler."""

    def __init__(self, config: uvicorn.Config, guard: Guard):
        super().__init__(config)
        self.guard = guard

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(self.guard.loop_error)
        await super().serve(sockets)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with the two limits uvicorn lacks:

    - A header deadline. uvicorn never times out a connection that has not sent a whole
      request's headers: its keep-alive timer starts only after an answer, and any byte
      received cancels it. Silent or trickling connections stayed open for ever and
      exhausted the file descriptors. Here a connection must complete a request's headers
      within `header_timeout_s` of connecting and of each answer, or is closed. Once they
      are in, the handler takes as long as it takes: a slow client is cut off, never a slow
      handler. The body is not under the deadline (the PPO services take bodies of hundreds
      of MiB); handlers check the key before they read one, so only a key holder is waited for.
    - A cap on open connections. uvicorn's `limit_concurrency` answers 503 to requests over
      its limit, but a connection that never sends a request is accepted and kept: it
      bounds nothing against idle connections. Here a connection over `max_connections`
      makes room by closing the one that has waited longest for a request's headers, so
      idle connections cannot lock clients out; when every other connection is being
      answered, the new one is closed at once.

    Its warning per malformed request is throttled too (MalformedThrottled). It relies only
    on asyncio's connection_made/connection_lost and on uvicorn's on_response_complete
    (called once an answer is sent), `cycle` (the request being answered), `connections`
    (the server's open ones), `loop` and `logger`, alike in uvicorn 0.30
    (pyproject's lowest) and 0.54; tests/unit/test_http.py passes with both."""

    def __init__(self, *args, guard: Guard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.deadline: asyncio.TimerHandle | None = None
        self.logger = MalformedThrottled(self.logger, guard)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.guard.max_connections and not self._make_room():
            self.guard.refusals.warn("%s: %d connections are open, all being answered: refusing more", self.guard.name,
                                     self.guard.max_connections)
            transport.close()
            return
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        super().connection_lost(exc)

    def waiting(self) -> bool:
        """Whether the connection waits for a request's headers (no request is being answered)."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        if not self.transport.is_closing():
            self.deadline = self.loop.call_later(self.guard.header_timeout_s, self._expire)

    def _expire(self) -> None:
        if self.waiting():
            self.transport.close()

    def _make_room(self) -> bool:
        """Whether this connection may stay: the ones being closed (they leave `connections`
        a loop step later) make room, else the one that has waited longest for a request's
        headers (the earliest deadline) is closed; False when every other one is being answered."""
        others = [c for c in self.connections if c is not self and not c.transport.is_closing()]
        if len(others) < self.guard.max_connections:
            return True
        idle = [c for c in others if c.deadline is not None and c.waiting()]
        if not idle:
            return False
        min(idle, key=lambda c: c.deadline.when()).transport.close()
        return True


class MalformedThrottled:
    """uvicorn's logger for one connection, with its warning about each malformed request
    (one line per request: anyone who can connect could fill the log at network speed)
    logged through the server's throttle; every other record as before."""

    def __init__(self, logger: logging.Logger, guard: Guard):
        self.logger, self.guard = logger, guard

    def warning(self, message: str, *args, **kwargs) -> None:
        if message == MALFORMED_REQUEST:
            self.guard.malformed.warn("%s: malformed HTTP requests answered 400", self.guard.name)
        else:
            self.logger.warning(message, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.logger, name)
