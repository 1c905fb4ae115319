"""The shared HTTP pieces (offline_rlhf/http.py) on a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import os
import socket

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from offline_rlhf.http import (
    ERROR_CHARS,
    authorized,
    bearer,
    json_error,
    listen,
    one_line,
    read_capped_body,
    read_token,
    write_token,
)

CAP = 1000
SECRET = "s3cret"


async def echo(request: Request):
    if not authorized(request, bearer(SECRET)):
        return json_error(401, "wrong\nkey", code="invalid_api_key")
    body = await read_capped_body(request, CAP)
    if body is None:
        return json_error(413, "too large")
    return JSONResponse({"size": len(body)})


@pytest.fixture(scope="module")
def server():
    listening = listen(Starlette(routes=[Route("/echo", echo, methods=["POST"])]), "127.0.0.1", 0, "http-test")
    yield listening
    listening.stop()


def post(server, content, token=SECRET):
    return httpx.post(f"{server.url}/echo", content=content, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_bodies_up_to_the_cap_are_read_and_larger_ones_refused_declared_or_streamed(server):
    assert post(server, b"x" * CAP).json() == {"size": CAP}
    assert post(server, b"x" * (CAP + 1)).status_code == 413
    chunks = (b"y" * 300 for _ in range(4))  # no Content-Length: chunked, cut once over the cap
    assert post(server, chunks).status_code == 413
    assert post(server, b"ok").json() == {"size": 2}  # the server goes on


def test_a_wrong_key_gets_an_openai_shaped_one_line_error(server):
    response = post(server, b"", token="guess")
    assert response.status_code == 401
    assert response.json() == {"error": {"message": "wrong key", "type": "invalid_request_error", "param": None,
                                         "code": "invalid_api_key"}}


@pytest.mark.parametrize("header, status", [
    (f"Bearer {SECRET}", 200), (f"bearer {SECRET}", 200), (f"BEARER  {SECRET}", 200),  # RFC 7235: any case
    (f"Bearer {SECRET.upper()}", 401), (f"Basic {SECRET}", 401), (SECRET, 401), ("Bearer", 401), (None, 401),
])
def test_the_bearer_scheme_is_case_insensitive_and_the_key_is_not(server, header, status):
    headers = {} if header is None else {"Authorization": header}
    assert httpx.post(f"{server.url}/echo", content=b"", headers=headers, timeout=10).status_code == status


def test_listen_binds_only_the_configured_address(server):
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    with pytest.raises(OSError):  # another loopback address reaches this host, but nothing listens there
        socket.create_connection(("127.0.0.2", server.port), timeout=5).close()
    with pytest.raises(OSError):  # the port is taken: a second server there fails to start
        listen(Starlette(), "127.0.0.1", server.port, "second")


def test_one_line_joins_and_cuts():
    assert one_line("a\n  b\tc") == "a b c"
    assert len(one_line("x" * (ERROR_CHARS + 50))) == ERROR_CHARS


def test_token_files_are_private_and_checked(tmp_path):
    path = tmp_path / "dir" / "token"
    token = write_token(path)
    assert os.stat(path).st_mode & 0o777 == 0o600 and read_token(path) == token and len(token) >= 40
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="readable by its owner only"):
        read_token(path)
    path.write_text("\n")
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match="empty"):
        read_token(path)
