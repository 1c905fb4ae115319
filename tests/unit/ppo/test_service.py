"""A real Service on 127.0.0.1: answers, authentication, limits, errors and shutdown."""

import os
import socket
import threading
import time

import httpx
import pytest
import torch

from ppo_baseline.service import Client, Service, ServiceError, health_proof, read_token, write_token
from ppo_baseline.wire import Payload, Schema, TensorSpec, encode

TOKEN = "test-token"
MAX_BODY = 4096
IN = Schema({"x": TensorSpec(torch.float32, ("B", "T"))}, meta={"step": int})
OUT = Schema({"y": TensorSpec(torch.float32, ("B", "T"))}, meta={"step": int})
JOIN_S = 10


def double(payload: Payload) -> Payload:
    return Payload({"y": payload.tensors["x"] * 2}, {"step": payload.meta["step"] + 1})


def fail(payload: Payload) -> Payload:
    raise RuntimeError("kaboom\nwith a second line")


def reject(payload: Payload) -> Payload:
    raise ValueError("x must be positive")


class Running:
    """A started service whose calls are served by a background thread, as a main thread would."""

    def __init__(self):
        self.service = Service("critic", TOKEN, port=0, max_body_bytes=MAX_BODY)
        self.handler_threads = []
        for name, handler in {"double": double, "fail": fail, "reject": reject}.items():
            self.service.route(name, self._recording(handler), IN)
        self.service.start()
        self.serving = threading.Thread(target=self.service.serve, kwargs={"poll_s": 0.02}, name="critic-serve")
        self.serving.start()
        self.http = httpx.Client(base_url=self.service.url, timeout=JOIN_S)
        self.client = Client("critic", self.service.url, TOKEN, timeout_s=JOIN_S, retries=1, backoff_s=0.01)

    def _recording(self, handler):
        def run(payload):
            self.handler_threads.append(threading.current_thread())
            return handler(payload)
        return run

    def post(self, endpoint, body, token=TOKEN, **kwargs):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.http.post(f"/{endpoint}", content=body, headers=headers, **kwargs)

    def close(self):
        self.http.close()
        self.client.close()
        self.service.stop()
        self.serving.join(JOIN_S)


@pytest.fixture
def running():
    running = Running()
    yield running
    running.close()
    alive = [thread.name for thread in threading.enumerate() if thread.name.startswith("critic-")]
    assert not alive, f"threads left running: {alive}"


def payload(step=3):
    return Payload({"x": torch.arange(6, dtype=torch.float32).view(2, 3)}, {"step": step})


def assert_still_serving(running):
    answer = running.client.call("double", payload(), OUT)
    torch.testing.assert_close(answer.tensors["y"], payload().tensors["x"] * 2)


def test_answer_over_http_equals_a_direct_call_on_the_serving_thread(running):
    answer = running.client.call("double", payload(), OUT)
    direct = double(payload())
    torch.testing.assert_close(answer.tensors["y"], direct.tensors["y"])
    assert answer.meta == direct.meta == {"step": 4}
    assert running.handler_threads == [running.serving]


def test_port_zero_reports_the_bound_port(running):
    assert running.service.port > 0
    assert running.service.url == f"http://127.0.0.1:{running.service.port}"


def test_health_needs_no_token_and_tells_only_the_name_readiness_and_a_proof_of_the_token(running):
    running.service.step = 12  # the weights' path and the training step are nobody's business
    assert running.http.get("/health").json() == {"name": "critic", "ready": True}
    nonce = "0123456789abcdef"
    assert running.http.get("/health", params={"nonce": nonce}).json() == {
        "name": "critic", "ready": True, "proof": health_proof(TOKEN, "critic", nonce)}
    for bad in ("short", "x" * 129, "not/url-safe-0123456789"):
        response = running.http.get("/health", params={"nonce": bad})
        assert (response.status_code, response.text) == (400, "nonce must match [A-Za-z0-9_-]{16,128}")


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x"])
def test_missing_or_wrong_token_is_401(running, token):
    assert running.post("double", encode(payload()), token=token).status_code == 401
    assert running.post("shutdown", b"", token=token).status_code == 401
    assert_still_serving(running)


@pytest.mark.parametrize("body", [b"garbage", b"", encode(Payload({"x": torch.zeros(2, 3, dtype=torch.int64)},
                                                                   {"step": 1}))])
def test_malformed_payload_is_400_and_the_service_goes_on(running, body):
    response = running.post("double", body)
    assert response.status_code == 400
    assert response.text.startswith("WireError: ")
    assert_still_serving(running)


def test_oversized_body_is_413_declared_or_streamed(running):
    big = b"\0" * (MAX_BODY + 1)
    assert running.post("double", big).status_code == 413
    chunks = iter([b"\0" * 1024] * 8)  # no Content-Length: sent chunked
    assert running.post("double", chunks).status_code == 413
    assert_still_serving(running)


def test_handler_exceptions_are_400_or_500_and_the_service_goes_on(running):
    response = running.post("reject", encode(payload()))
    assert (response.status_code, response.text) == (400, "ValueError: x must be positive")
    response = running.post("fail", encode(payload()))
    assert (response.status_code, response.text) == (500, "RuntimeError: kaboom with a second line")
    assert_still_serving(running)


def test_client_errors_name_the_service_and_do_not_retry_a_500(running):
    with pytest.raises(ServiceError, match=r"critic service at http://127\.0\.0\.1:\d+/fail: HTTP 500: RuntimeError"):
        running.client.call("fail", payload(), OUT)
    assert len(running.handler_threads) == 1
    with pytest.raises(ServiceError, match="/nothing: HTTP 404"):
        running.client.call("nothing", payload(), OUT)


def test_shutdown_stops_serving_and_the_server(running):
    running.client.shutdown()
    running.serving.join(JOIN_S)
    running.service._thread.join(JOIN_S)
    assert not running.serving.is_alive() and not running.service._thread.is_alive()
    with pytest.raises(ServiceError, match="cannot connect"):
        running.client.call("double", payload(), OUT)


def test_calls_still_queued_at_stop_are_answered_503():
    service = Service("critic", TOKEN).start()  # nobody runs serve(): calls wait in the queue
    service.route("double", double, IN)
    statuses = []
    with httpx.Client(base_url=service.url, timeout=JOIN_S) as http:
        sender = threading.Thread(target=lambda: statuses.append(http.post(
            "/double", content=encode(payload()), headers={"Authorization": f"Bearer {TOKEN}"}).status_code),
            name="critic-sender")
        sender.start()
        deadline = time.monotonic() + JOIN_S
        while service._calls.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        service.stop()
        sender.join(JOIN_S)
    assert statuses == [503]


def test_client_retries_connection_failures_then_names_the_service():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]  # closed on exit: nothing listens there
    with Client("reward", f"http://127.0.0.1:{port}", TOKEN, retries=2, backoff_s=0.01) as client:
        with pytest.raises(ServiceError, match=rf"reward service at http://127.0.0.1:{port}/health: cannot connect .* "
                                               "after 3 attempts"):
            client.health()


def test_route_names_are_checked():
    service = Service("actor", TOKEN)
    for name in ("health", "shutdown", "a/b", ""):
        with pytest.raises(ValueError, match="invalid endpoint name"):
            service.route(name, double, IN)


def test_token_file_is_owner_only(tmp_path):
    path = tmp_path / "run" / "ppo.token"
    token = write_token(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert read_token(path) == token and len(token) >= 40
    assert write_token(path) != token
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="readable by its owner only"):
        read_token(path)
