"""A Service run by a whole torchrun world: rank 0 serves HTTP, every rank runs every request.

Rank 0's `serve()` takes each queued call and, before running it, broadcasts a message
(kind, endpoint, body) to the other ranks, which wait in `follow()`: all ranks then run
`execute` on the same bytes, so collective forwards (TP all-reduces, FSDP gathers, DP
all-gathers) line up; only rank 0's answer goes back over HTTP. A failing request fails
on every rank alike (decoding and validation are deterministic), so the ranks stay in step.
While idle, rank 0 broadcasts a keep-alive every KEEPALIVE_S, since a rank waiting in a
broadcast longer than the process group's timeout would abort the world; STOP ends it.

`watch_parent` stops the service once the actor process is gone (killed, or crashed
without shutting its services down), so no service holds a device forever.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from contextlib import contextmanager

from offline_rlhf.host import start_ticks
from offline_rlhf.ledger import Usage
from offline_rlhf.runtime import Runtime
from offline_rlhf.serving.world import CALL, KEEPALIVE, KEEPALIVE_S, STOP, broadcast_message, receive_message
from ppo_baseline.service import Service

log = logging.getLogger(__name__)


class WorldService(Service):
    """A Service whose calls run on every rank of `rt`'s world (see the module docstring).
    Build it on every rank; `start()` (HTTP) on rank 0 only; then `run_world()` on all."""

    def __init__(self, name: str, token: str, rt: Runtime, **kwargs):
        super().__init__(name, token, **kwargs)
        self.rt = rt

    def execute(self, endpoint: str, body: bytes) -> bytes:
        if self.rt.is_main:
            broadcast_message(self.rt, CALL, endpoint, body)
        return super().execute(endpoint, body)

    def serve(self, poll_s: float = 0.1) -> None:
        """Service.serve with a keep-alive broadcast while idle and STOP at the end."""
        self._serving.set()
        last = time.monotonic()
        try:
            while not self._stopping.is_set():
                try:
                    call = self._calls.get(timeout=poll_s)
                except queue.Empty:
                    if self.rt.group is not None and time.monotonic() - last > KEEPALIVE_S:
                        broadcast_message(self.rt, KEEPALIVE)
                        last = time.monotonic()
                    continue
                self._run(call)
                last = time.monotonic()
        finally:
            self._serving.clear()
            self._fail_pending()
            broadcast_message(self.rt, STOP)

    def follow(self) -> None:
        """Ranks other than 0: run what rank 0 broadcasts until STOP. Errors are rank 0's
        to report; here they are only logged (the same request failed there too)."""
        while True:
            kind, endpoint, body = receive_message(self.rt)
            if kind == STOP:
                return
            if kind == CALL:
                try:
                    super().execute(endpoint, body)
                except Exception as error:  # noqa: BLE001 - rank 0 answers the client with it
                    log.debug("%s /%s failed on rank %d: %s", self.name, endpoint, self.rt.env.rank, error)

    def run_world(self) -> None:
        """Rank 0 serves until POST /shutdown (or stop()); the others follow it."""
        if self.rt.is_main:
            self.serve()
        else:
            self.follow()


def watch_parent(service: Service, pid: int, ticks: int | None, usage: Usage, poll_s: float = 1.0) -> threading.Thread:
    """Stop `service` once process `pid` (started at `ticks`, so a reused PID does not
    count) is gone, its ledger row (`usage`) then reading interrupted, as the run is.
    Returns the daemon thread watching it."""
    def watch() -> None:
        while not service._stopping.is_set():
            now = start_ticks(pid)
            if now is None or (ticks is not None and now != ticks):
                print(f"{service.name}: the actor (pid {pid}) is gone; shutting down", flush=True)
                usage.interrupted = True
                service.stop(timeout_s=0)
                return
            time.sleep(poll_s)

    thread = threading.Thread(target=watch, name=f"{service.name}-parent-watch", daemon=True)
    thread.start()
    return thread


@contextmanager
def sigterm_exits():
    """In the block, SIGTERM raises SystemExit(143) in the main thread instead of ending the
    process at once, so `finally` blocks run: the actor shuts its services down, a service
    (Slurm's time limit, the actor's last resort) writes its ledger row. Restored after."""
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)
