"""Requests that arrive together share the engine's continuous batch.

The HTTP thread turns each request into a Job (prompt tokens, per-prompt token budgets,
sampling) and queues it. The main thread (`serve`) takes every job queued by then, groups
those that one engine `run` can serve (the same decoding rule and stop strings: the
engine's GenerationConfig and stop check are per run), and runs each group as one batch
of requests: a request arriving while a batch runs waits for the next one. Sampling is
keyed per row, so an answer is the same whatever it was batched with: sample i of a
request with seed s samples the stream `stream_id(s, i)` (prompt p of a completions
request: sample p * n + i) under engine seed 0.

A job may carry a per-token callback (a streamed answer): rank 0's engine run calls it
with (row of the job, completion so far) after each token, on this main thread. A callback
that fails is dropped, never the batch. A job whose client left (`gone`) is dropped if no
batch took it yet, else its rows end at the engine's next cancellation poll, freeing their
slots. In a TP world rank 0 broadcasts each batch (JSON bytes, see world.py) before
running it, and the rows to cancel at each poll; the other ranks (`follow`) run the same
batch, with no callbacks, so their collectives line up.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.generation.engine import (
    Cancelled,
    Completion,
    DecodeSession,
    Request,
    TokenCallback,
    run,
    stop_on_strings,
)
from offline_rlhf.generation.sampling import stream_id
from offline_rlhf.runtime import Runtime
from offline_rlhf.serving.model import ServedModel
from offline_rlhf.serving.protocol import Sampling
from offline_rlhf.serving.world import CALL, KEEPALIVE, KEEPALIVE_S, STOP, broadcast_message, receive_message

log = logging.getLogger(__name__)


class ServerStopping(RuntimeError):
    """The server shut down before running a queued job (HTTP 503)."""


@dataclass
class Job:
    prompts: list[list[int]]
    budgets: list[int]  # max new tokens per prompt
    sampling: Sampling
    # Receives, per prompt, its n Completions, or the exception the batch raised.
    future: Future = field(default_factory=Future)
    # Streaming: called on the engine thread after each token of the job's row (prompt p,
    # sample i: row p * n + i) with (row, the row's Completion so far).
    on_token: TokenCallback | None = None
    gone: threading.Event = field(default_factory=threading.Event)  # set when its client left

    def key(self) -> tuple:
        """Jobs with equal keys can share one engine run."""
        s = self.sampling
        return (True, 1.0, 1.0, s.stop) if s.greedy else (False, s.temperature, s.top_p, s.stop)

    def row_count(self) -> int:
        return len(self.prompts) * self.sampling.n

    def rows(self) -> list[Request]:
        n, seed = self.sampling.n, self.sampling.seed
        return [Request(prompt, stream_id(seed, p * n + i), budget)
                for p, (prompt, budget) in enumerate(zip(self.prompts, self.budgets)) for i in range(n)]


class Batcher:
    def __init__(self, served: ServedModel, rt: Runtime, slots: int, cuda_graphs: bool = True,
                 compile_step: bool = True):
        self.served, self.rt, self.slots = served, rt, slots
        # One cache and decode step for every batch: CUDA graphs are captured once per shape.
        self.session = DecodeSession(served.model, rt.device, GenerationConfig(cuda_graphs=cuda_graphs,
                                                                                compile=compile_step))
        self.generated = 0  # tokens generated, for the ledger
        self.batches = 0  # engine runs: fewer than the requests when they shared batches
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._stopping = threading.Event()
        self._released = False
        self.serving = threading.Event()

    def submit(self, job: Job) -> Future:
        """Queue a job (any thread); its future resolves once a batch ran it."""
        if self._stopping.is_set():
            raise ServerStopping("the server is shutting down")
        self._jobs.put(job)
        if self._stopping.is_set() and not self.serving.is_set():
            self._fail_pending()  # serve() ended between the check and the put: nobody else will answer it
        return job.future

    def stop(self) -> None:
        self._stopping.set()

    def serve(self, poll_s: float = 0.05) -> None:
        """Rank 0's main thread: run queued jobs in shared batches until stop()."""
        self.serving.set()
        last = time.monotonic()
        try:
            while not self._stopping.is_set():
                jobs = self._take(poll_s)
                if jobs:
                    self._run_jobs(jobs)
                    last = time.monotonic()
                elif self.rt.group is not None and time.monotonic() - last > KEEPALIVE_S:
                    broadcast_message(self.rt, KEEPALIVE)
                    last = time.monotonic()
        finally:
            self.serving.clear()
            self._fail_pending()
            self.release_followers()

    def release_followers(self) -> None:
        """Rank 0: end the other ranks' `follow` (once; also when serving never started)."""
        if not self._released:
            self._released = True
            broadcast_message(self.rt, STOP)

    def follow(self) -> None:
        """Ranks other than 0: run every batch rank 0 broadcasts, until STOP. Failures are
        rank 0's to answer (the same batch failed there); here they are only logged."""
        while True:
            kind, _, body = receive_message(self.rt)
            if kind == STOP:
                return
            if kind == CALL:
                try:
                    self.execute(body, cancelled=self._told_cancelled)
                except Exception as error:  # noqa: BLE001 - rank 0 answers the clients with it
                    log.debug("batch failed on rank %d: %s", self.rt.env.rank, error)

    def warm_up(self) -> None:
        """One batch of one row and one of two before serving (one process only: the other
        ranks of a world run only what rank 0 broadcasts): on CUDA the decode step is then
        compiled for one row and for several, not during a client's first requests. The
        session holds every slot first, so the graphs captured now serve later batches."""
        self.session.fit(self.slots, 1)
        prompt = [self.served.tokenizer.pad_id or 0]
        for rows in (1, 2):
            self.execute(batch_body([Request(prompt, row, 2) for row in range(rows)], True, 1.0, 1.0, ()))

    def execute(self, body: bytes, on_token: TokenCallback | None = None,
                cancelled: Cancelled | None = None) -> list[Completion]:
        """What every rank runs per batch: the engine on the batch's requests (rank 0 with
        the streaming jobs' callbacks), ending the rows `cancelled` names."""
        batch = json.loads(body)
        stop = tuple(batch["stop"])
        requests = [Request(prompt, stream, budget) for prompt, stream, budget in batch["requests"]]
        cfg = GenerationConfig(max_new_tokens=max(r.max_new_tokens for r in requests), greedy=batch["greedy"],
                               temperature=batch["temperature"], top_p=batch["top_p"], seed=0,
                               batch_size=self.slots, stop=list(stop))
        tokenizer = self.served.tokenizer
        return run(self.served.model, requests, cfg, self.served.stop_ids, tokenizer.pad_id, self.rt.device,
                   stop=stop_on_strings(tokenizer.decode, stop), on_token=on_token, session=self.session,
                   cancelled=cancelled)

    def _told_cancelled(self) -> list[int]:
        """Ranks other than 0, at each of the engine's polls: the rows rank 0 cancels."""
        _, _, body = receive_message(self.rt)
        return json.loads(body) if body else []

    def _cancelled(self, group: list[Job]) -> Cancelled:
        """Rank 0's poll for one batch: the rows of jobs whose client left, told to the
        other ranks of a world (nothing but the header while nobody left)."""
        owners = [job for job in group for _ in range(job.row_count())]
        logged: set[int] = set()

        def cancelled() -> list[int]:
            rows = [row for row, job in enumerate(owners) if job.gone.is_set()]
            broadcast_message(self.rt, CALL, body=json.dumps(rows).encode() if rows else b"")
            if len(rows) > len(logged):
                self.rt.log(f"serve: {len(rows) - len(logged)} row(s) of the running batch given up: their client left")
                logged.update(rows)
            return rows

        return cancelled

    def _take(self, poll_s: float) -> list[Job]:
        """Every job queued now (waiting up to poll_s for the first), cancelled ones dropped."""
        try:
            jobs = [self._jobs.get(timeout=poll_s)]
        except queue.Empty:
            return []
        while True:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        # A job whose client went away was cancelled by the HTTP side (see server.py).
        return [job for job in jobs if job.future.set_running_or_notify_cancel()]

    def _run_jobs(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.key(), []).append(job)
        for (greedy, temperature, top_p, stop), group in groups.items():
            rows = [row for job in group for row in job.rows()]
            body = batch_body(rows, greedy, temperature, top_p, stop)
            try:
                broadcast_message(self.rt, CALL, "generate", body)
                completions = self.execute(body, token_callback(group), self._cancelled(group))
            except Exception as error:  # noqa: BLE001 - the clients get it as a 500; the server goes on
                log.error("a batch of %d request(s) failed", len(group), exc_info=error)
                for job in group:
                    job.future.set_exception(error)
                continue
            self.generated += sum(len(c.tokens) for c in completions)
            self.batches += 1
            for job in group:
                n = job.sampling.n
                mine, completions = completions[:job.row_count()], completions[job.row_count():]
                job.future.set_result([mine[p * n:(p + 1) * n] for p in range(len(job.prompts))])

    def _fail_pending(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ServerStopping("the server is shutting down"))


def token_callback(group: list[Job]) -> TokenCallback | None:
    """The engine's callback for one batch: each streaming job hears of its own rows only.
    A job's callback that raises is dropped (the batch goes on; that stream's handler gets
    the rest of its answer from the job's result)."""
    if not any(job.on_token for job in group):
        return None
    owners = [(job, row) for job in group for row in range(job.row_count())]

    def on_token(index: int, completion: Completion) -> None:
        job, row = owners[index]
        if job.on_token is None:
            return
        try:
            job.on_token(row, completion)
        except Exception as error:  # noqa: BLE001 - one client's stream, not the batch
            log.error("a streamed answer's callback failed; its stream ends", exc_info=error)
            job.on_token = None

    return on_token


def batch_body(rows: list[Request], greedy: bool, temperature: float, top_p: float, stop: tuple[str, ...]) -> bytes:
    """One engine batch as every rank of a world receives it (JSON bytes, never pickle)."""
    return json.dumps({"greedy": greedy, "temperature": temperature, "top_p": top_p, "stop": list(stop),
                       "requests": [[r.prompt, r.stream, r.max_new_tokens] for r in rows]}).encode()
