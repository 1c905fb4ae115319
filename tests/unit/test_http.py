"""The shared HTTP pieces (offline_rlhf/http.py) on a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from offline_rlhf.http import (
    ERROR_CHARS,
    authorized,
    bearer,
    json_error,
    listen,
    one_line,
    open_file_limit,
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



# --- slow and idle clients: the header deadline and the connection cap ---------------------

# Seconds, with margins of a second or more either side of each deadline, so a loaded,
# slow machine neither misses one nor sees one early.
DEADLINE_S = 2.0
SLOW_S = 3.5  # a handler slower than the deadline


async def fast(request: Request):
    return PlainTextResponse("ok")


async def slow(request: Request):
    await asyncio.sleep(SLOW_S)
    return PlainTextResponse("slow ok")


def guarded(**limits):
    return listen(Starlette(routes=[Route("/", fast), Route("/slow", slow)]), "127.0.0.1", 0, "guard-test", **limits)


def ask(sock: socket.socket, path: str = "/") -> bytes:
    """One HTTP/1.1 request on an open connection (kept alive) and its answer's body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return answer_body(sock)


def answer_body(sock: socket.socket) -> bytes:
    """The body of the next answer on `sock` (its head and body may come in several reads)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < length(data):
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection; got {data!r}"
        data += chunk
    return data.partition(b"\r\n\r\n")[2]


def length(answer: bytes) -> int:
    head = answer.partition(b"\r\n\r\n")[0].lower()
    return int(head.split(b"content-length: ")[1].split(b"\r\n")[0])


def closed_within(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the server closes `sock` within timeout_s (it sends nothing before)."""
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def open_connections(server) -> int:
    return len(server.server.server_state.connections)


def wait_for(condition, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_connections_that_do_not_send_a_requests_headers_in_time_are_closed_but_slow_handlers_answer():
    server = guarded(header_timeout_s=DEADLINE_S)
    try:
        silent = socket.create_connection(("127.0.0.1", server.port))
        half = socket.create_connection(("127.0.0.1", server.port))
        half.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with socket.create_connection(("127.0.0.1", server.port)) as kept:
            assert ask(kept) == b"ok"
            assert ask(kept, "/slow") == b"slow ok"  # the handler took longer than the deadline
            time.sleep(DEADLINE_S / 4)  # past the deadline counted from connecting, not from the answer
            assert ask(kept) == b"ok"  # the same connection, kept alive, within the deadline
            kept.sendall(b"GET / HTTP/1.1\r\n")  # after an answer, the next request's headers trickle in
            for _ in range(3):
                time.sleep(DEADLINE_S / 2)
                try:
                    kept.sendall(b"X-Trickle: 1\r\n")
                except OSError:
                    break
            # closed at the deadline, a second or more ago; a deadline restarted by each header
            # line would close it only DEADLINE_S after the last, later than this waits
            assert closed_within(kept, DEADLINE_S / 2)
        # silent and half were closed at their deadline, long before this
        assert closed_within(silent, 0.1) and closed_within(half, 0.1)
        assert wait_for(lambda: open_connections(server) == 0)
    finally:
        server.stop()


def test_a_connection_is_not_closed_before_its_deadline():
    server = guarded(header_timeout_s=3 * DEADLINE_S)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")
            assert not closed_within(sock, 1.5 * DEADLINE_S)  # for half its deadline
            sock.sendall(b"Host: 127.0.0.1\r\n\r\n")  # completed in time: answered
            assert answer_body(sock) == b"ok"
    finally:
        server.stop()


def test_over_the_cap_the_longest_idle_connection_makes_room_and_when_all_are_answering_a_new_one_is_closed():
    cap = 4
    server = guarded(max_connections=cap, header_timeout_s=30)
    try:
        idle = []
        for _ in range(cap):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
            assert wait_for(lambda: open_connections(server) == len(idle))
        assert httpx.get(f"{server.url}/", timeout=5).text == "ok"  # answered at the cap
        assert closed_within(idle[0], 1.0)  # the longest idle one made room
        assert not any(closed_within(sock, 0.05) for sock in idle[1:])
        answers = []
        busy = [threading.Thread(target=lambda: answers.append(httpx.get(f"{server.url}/slow", timeout=10).text))
                for _ in range(cap)]
        for thread in busy:
            thread.start()
        assert all(closed_within(sock, 1.0) for sock in idle[1:])  # each made room for a request
        assert wait_for(lambda: open_connections(server) == cap and not any(
            c.waiting() for c in server.server.server_state.connections))  # the slow requests' headers are in
        with socket.create_connection(("127.0.0.1", server.port)) as refused:
            assert closed_within(refused, 1.0)  # every open connection is being answered
        for thread in busy:
            thread.join(10)
        assert answers == ["slow ok"] * cap
        assert httpx.get(f"{server.url}/", timeout=5).text == "ok"
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_the_cap_stays_below_the_open_file_limit():
    server = guarded(max_connections=10**9)
    try:
        assert server.server.guard.max_connections == open_file_limit() // 2
    finally:
        server.stop()


# A server process left a few file descriptors: connections beyond them fail to be accepted.
OUT_OF_FILES = textwrap.dedent("""
    import logging, os, resource, sys
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from offline_rlhf.http import listen
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    async def fast(request):
        return PlainTextResponse("ok")
    server = listen(Starlette(routes=[Route("/", fast)]), "127.0.0.1", 0, "fd-test", header_timeout_s=60)
    hog = []
    try:
        while True:
            hog.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    for fd in hog[:10]:
        os.close(fd)
    print(server.port, flush=True)
    sys.stdin.read()
""")


def test_running_out_of_file_descriptors_is_logged_once_not_per_attempt():
    child = subprocess.Popen([sys.executable, "-c", OUT_OF_FILES], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]  # the kernel queues them
        time.sleep(3)  # asyncio retries the accept every second
        for sock in held:
            sock.close()
        answer = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)  # the connections gone, it accepts again
        assert answer.text == "ok"
    finally:
        _, stderr = child.communicate("", timeout=30)
    failures = [line for line in stderr.splitlines() if "cannot accept connections" in line]
    assert len(failures) == 1 and "Too many open files" in failures[0], stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]


def test_malformed_requests_are_answered_400_and_logged_once_not_per_request(caplog):
    """uvicorn logged one warning per malformed request: anyone who can connect could fill
    the log at network speed."""
    server = guarded()
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", server.port)) as sock:
                    sock.sendall(b"NOT HTTP\r\n\r\n")
                    assert sock.recv(4096).startswith(b"HTTP/1.1 400")
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                assert ask(sock) == b"ok"  # the server still answers
    finally:
        server.stop()
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert warnings == ["guard-test: malformed HTTP requests answered 400"], warnings
