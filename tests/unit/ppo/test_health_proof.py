"""The PPO client sends the run's token only to a peer that proved it holds it. A squatter on
a service's (on Slurm, predictable) port, here a real HTTP server on 127.0.0.1 recording what
it receives, never sees the token: not on /health, not on a call or a shutdown, not when it
relays the answer of another service of the run; the actor's readiness wait names it as
something else at that address at once, instead of polling it until the start-up timeout."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch

from ppo_baseline.config import SERVICES
from ppo_baseline.launch import ServiceFailed, Services
from ppo_baseline.serve import TOKEN_ENV, service_port
from ppo_baseline.service import Client, NotOurService, Service, write_token
from ppo_baseline.wire import Payload, Schema, TensorSpec
from tests.unit.ppo.test_launch_hetjob import ppo_config

TOKEN = "the-runs-shared-secret"
IN = Schema({"x": TensorSpec(torch.float32, ("B",))})


class Squatter:
    """A real HTTP server answering like a ready service: GET /health with `answer(query)`
    (JSON), any POST with 200; it records (method, path, Authorization) of every request."""

    def __init__(self, answer, port: int = 0):
        self.seen: list[tuple[str, str, str | None]] = []
        squatter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._reply(json.dumps(answer(self.path.partition("?")[2])).encode())

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._reply(b"{}")

            def _reply(self, body: bytes):
                squatter.seen.append((self.command, self.path, self.headers.get("Authorization")))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def critic():
    """A real critic service of the run (its /health answers proofs for "critic")."""
    service = Service("critic", TOKEN).start()
    service.route("echo", lambda payload: payload, IN)
    thread = threading.Thread(target=service.serve, kwargs={"poll_s": 0.02}, daemon=True)
    thread.start()
    yield service
    service.stop()
    thread.join(10)


def assert_refused_without_the_token(squatter: Squatter, name: str):
    with Client(name, squatter.url, TOKEN, retries=0) as client:
        address = squatter.url.removeprefix("http://")
        for attempt in (client.health, lambda: client.call("echo", Payload({"x": torch.ones(2)}), IN),
                        client.shutdown):
            with pytest.raises(NotOurService, match=f"^something else answers at {address}: not our {name} "
                                                    "service"):
                attempt()
    assert squatter.seen and all(method == "GET" and auth is None for method, _, auth in squatter.seen)


def test_a_squatter_answering_ready_gets_no_token():
    squatter = Squatter(lambda query: {"name": "reward", "ready": True})
    try:
        assert_refused_without_the_token(squatter, "reward")
        assert all(path.startswith("/health?nonce=") for _, path, _ in squatter.seen)
        assert len({path for _, path, _ in squatter.seen}) == len(squatter.seen)  # a fresh nonce each time
    finally:
        squatter.close()


def test_a_squatter_relaying_another_services_proof_gets_no_token(critic):
    """The proof binds the service's name: the critic's, relayed, does not pass for the reward's."""
    def relay(query):
        return httpx.get(f"{critic.url}/health?{query}", trust_env=False).json()

    squatter = Squatter(relay)
    try:
        assert "proof" in relay("nonce=0123456789abcdef")  # the relay works: the critic answers it
        assert_refused_without_the_token(squatter, "reward")
    finally:
        squatter.close()


def test_the_real_service_proves_itself_and_then_gets_the_token(critic):
    with Client("critic", critic.url, TOKEN, retries=0) as client:
        torch.testing.assert_close(client.call("echo", Payload({"x": torch.ones(2)}), IN).tensors["x"], torch.ones(2))
        assert client.health()["ready"]
    with Client("critic", critic.url, "another-runs-token", retries=0) as stranger:
        with pytest.raises(NotOurService, match="not our critic service"):  # nor is it ours, seen from another run
            stranger.health()


def test_a_squatter_taking_the_port_of_a_service_that_died_gets_no_token(critic):
    """The proof is asked before every call, not once per address: a service that dies
    frees its port, and whatever binds it next is someone else."""
    port = critic.port
    with Client("critic", critic.url, TOKEN, retries=0) as client:
        client.call("echo", Payload({"x": torch.ones(2)}), IN)
        critic.stop()
        squatter = Squatter(lambda query: {"name": "critic", "ready": True}, port=port)
        try:
            with pytest.raises(NotOurService, match=f"something else answers at 127.0.0.1:{port}"):
                client.call("echo", Payload({"x": torch.ones(2)}), IN)
            assert squatter.seen and all(auth is None for _, _, auth in squatter.seen)
        finally:
            squatter.close()


def test_the_actor_fails_at_once_naming_what_squats_a_services_port(tmp_path, monkeypatch):
    token = write_token(tmp_path / "token")
    monkeypatch.setenv(TOKEN_ENV, str(tmp_path / "token"))
    monkeypatch.setenv("SLURM_JOB_ID", "1717")
    monkeypatch.setenv("SLURM_JOB_NODELIST_HET_GROUP_1", "127.0.0.1")
    real = [Service(name, token, port=service_port(name)).start() for name in SERVICES if name != "reward"]
    threads = [threading.Thread(target=service.serve, kwargs={"poll_s": 0.02}, daemon=True) for service in real]
    for thread in threads:
        thread.start()
    squatter = Squatter(lambda query: {"name": "reward", "ready": True}, port=service_port("reward"))
    address = f"127.0.0.1:{service_port('reward')}"
    started = time.monotonic()
    try:
        cfg = ppo_config(tmp_path, dict.fromkeys(SERVICES, 1))  # startup_timeout_s=20
        with pytest.raises(ServiceFailed, match=f"^services.reward: the reward service cannot be reached: something "
                                                f"else answers at {address}: not our reward service"):
            with Services(cfg, tmp_path / "ppo"):
                pass
        assert time.monotonic() - started < 10
        assert squatter.seen and all(auth is None for _, _, auth in squatter.seen)
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive()  # the real services were asked to shut down
    finally:
        squatter.close()
        for service in real:
            service.stop()
