"""The HTTP pieces every service of the project shares (the PPO modules, `orlhf serve`):
the bearer secret and its file, the request-size cap, the bearer check, error text on one
line, JSON error answers, and uvicorn started on an explicitly bound socket in a thread.

Starlette on uvicorn; nothing here unpickles or evaluates what a client sends.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse

ERROR_CHARS = 500  # error messages are one line, cut to this length


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


def listen(app, host: str, port: int, name: str, timeout_s: float = 30.0) -> Listening:
    """Bind exactly `host:port` (port 0 picks a free one, reported in the result) and run
    uvicorn on that socket in a daemon thread; returns once it accepts connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    # log_config=None: uvicorn's records go to the process's own logging setup instead of
    # handlers that uvicorn would install globally.
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
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
