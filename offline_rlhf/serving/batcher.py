"""Requests share the engine's continuous batch, also when they arrive while it runs.

The HTTP thread turns each request into a Job (prompt tokens, per-prompt token budgets,
sampling) and queues it. The main thread (`serve`) runs the queued jobs as one engine
batch (each row brings its own sampling rule, greedy or temperature/top_p, and its own
stop strings). While it runs, the engine polls every few steps (`RunningBatch.poll`):
jobs queued since join it in arrival order (their rows take the next free slots) while
its cache columns hold them; from the first that does not on, they wait for the next
batch (none is overtaken for ever). A job is answered as soon as its own rows have
ended. Sampling is keyed per row, so an answer is the same whatever it was batched with:
sample i of a request with seed s samples the stream `stream_id(s, i)` (prompt p of a
completions request: sample p * n + i) under engine seed 0.

A job may carry a per-token callback (a streamed answer): rank 0's engine run calls it
with (row of the job, completion so far) after each token, on this main thread. A callback
that fails is dropped, never the batch. A job whose client left (`gone`) is dropped if no
batch took it yet, else its rows end at the next poll, freeing their slots. In a TP world
rank 0 broadcasts each batch (JSON bytes, see world.py) before running it, and each poll's
changes; the other ranks (`follow`) run the same batch with the same changes, with no
callbacks, so their collectives line up.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.generation.engine import (
    Changes,
    Completion,
    DecodeSession,
    Poll,
    Request,
    Room,
    TokenCallback,
    run,
)
from offline_rlhf.generation.sampling import Rule, stream_id
from offline_rlhf.runtime import Runtime
from offline_rlhf.serving.model import ServedModel
from offline_rlhf.serving.protocol import Sampling
from offline_rlhf.serving.world import CALL, KEEPALIVE, KEEPALIVE_S, STOP, broadcast_message, receive_message

log = logging.getLogger(__name__)
CHANGES = "changes"  # the endpoint name of a poll's changes, as rank 0 tells them


class ServerStopping(RuntimeError):
    """The server shut down before running a queued job (HTTP 503)."""


@dataclass(eq=False)  # a job is itself: hashable by identity
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

    def row_count(self) -> int:
        return len(self.prompts) * self.sampling.n

    def rows(self) -> list[Request]:
        s = self.sampling
        n, seed, rule = s.n, s.seed, Rule(s.greedy, s.temperature, s.top_p)
        return [Request(prompt, stream_id(seed, p * n + i), budget, rule, s.stop)
                for p, (prompt, budget) in enumerate(zip(self.prompts, self.budgets)) for i in range(n)]


class Batcher:
    def __init__(self, served: ServedModel, rt: Runtime, slots: int, cuda_graphs: bool = True,
                 compile_step: bool = True, join_running: bool = True):
        self.served, self.rt, self.slots, self.join_running = served, rt, slots, join_running
        # One cache and decode step for every batch: CUDA graphs are captured once per shape.
        self.session = DecodeSession(served.model, rt.device, GenerationConfig(cuda_graphs=cuda_graphs,
                                                                                compile=compile_step))
        self.generated = 0  # tokens generated, for the ledger
        self.batches = 0  # engine runs: fewer than the requests when they shared batches
        self._jobs: queue.Queue[Job] = queue.Queue()
        self.waiting: list[Job] = []  # taken from the queue by the main thread, not yet in a batch
        self.running: RunningBatch | None = None  # the batch the engine runs now
        self._stopping = threading.Event()
        self._failing = threading.Lock()
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
                self.take(poll_s)
                if self.waiting:
                    self._run_waiting()
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
                    self.execute(body, poll=self._told_changes)
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
            self.execute(batch_body([Request(prompt, row, 2, Rule(), ()) for row in range(rows)]))

    def execute(self, body: bytes, on_token: TokenCallback | None = None, poll: Poll | None = None) -> None:
        """What every rank runs per batch: the engine on the batch's requests (rank 0 with
        the streaming jobs' callbacks, which take the answers), changed at each `poll`."""
        requests = [request_of(row) for row in json.loads(body)]
        # Its rule and stop strings are unused: every request brings its own.
        cfg = GenerationConfig(max_new_tokens=max(r.max_new_tokens for r in requests), seed=0, batch_size=self.slots)
        tokenizer = self.served.tokenizer
        # keep_tokens=False: a batch that runs for ever holds the answers in flight only.
        run(self.served.model, requests, cfg, self.served.stop_ids, tokenizer.pad_id, self.rt.device,
            decode=tokenizer.decode, on_token=on_token, session=self.session, poll=poll, keep_tokens=False)

    def take(self, timeout: float | None = None) -> None:
        """Move the jobs queued now to `waiting` (first waiting up to `timeout` for one)."""
        try:
            self.waiting.append(self._jobs.get(timeout=timeout) if timeout else self._jobs.get_nowait())
            while True:
                self.waiting.append(self._jobs.get_nowait())
        except queue.Empty:
            return

    def _told_changes(self, room: Room) -> Changes:
        """Ranks other than 0, at each of the engine's polls: the changes rank 0 made."""
        kind, name, body = receive_message(self.rt)
        if (kind, name) != (CALL, CHANGES):  # rank 0 left the batch early: its collectives will not line up
            raise RuntimeError(f"rank 0 sent message {kind} {name!r} where this batch's changes were due")
        told = json.loads(body)
        return Changes(told["cancel"], [request_of(row) for row in told["add"]])

    def _run_waiting(self) -> None:
        """Run the waiting jobs as one batch (jobs queued while it runs may join it)."""
        waiting, self.waiting = self.waiting, []
        jobs = [job for job in waiting if job.future.set_running_or_notify_cancel()]  # else its client left
        if jobs:
            self.running = RunningBatch(self, jobs)
            try:
                self.running.run()
            finally:
                self.running = None

    def _fail_pending(self) -> None:
        """Answer every job not in a batch with 503 (the main thread at its end, or the HTTP
        thread that queued a job just after: hence the lock)."""
        with self._failing:
            self.take()
            waiting, self.waiting = self.waiting, []
            for job in waiting:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(ServerStopping("the server is shutting down"))


class RunningBatch:
    """One engine run of rank 0: which job each row belongs to, jobs joining at the
    engine's polls, each job answered once its rows have ended (or given up once its
    client left). Holds the jobs in flight only: under steady load a batch never ends."""

    def __init__(self, batcher: Batcher, jobs: list[Job]):
        self.batcher = batcher
        self.requests = 0  # engine requests so far: the next one's index
        self.rows: dict[int, tuple[Job, int]] = {}  # engine request -> its job and the job's row (jobs in flight)
        self.indices: dict[Job, range] = {}  # job in flight -> its engine requests
        self.ended: dict[Job, dict[int, Completion]] = {}  # job in flight -> its rows that ended
        for job in jobs:
            self.own(job)

    def own(self, job: Job) -> None:
        self.indices[job] = range(self.requests, self.requests + job.row_count())
        self.rows.update((index, (job, row)) for row, index in enumerate(self.indices[job]))
        self.ended[job] = {}
        self.requests += job.row_count()

    def run(self) -> None:
        body = batch_body([row for job in self.indices for row in job.rows()])
        try:
            broadcast_message(self.batcher.rt, CALL, "generate", body)
            self.batcher.execute(body, self.on_token, self.poll)
        except Exception as error:  # noqa: BLE001 - the clients get it as a 500; the server goes on
            log.error("a batch of %d request(s) failed", len(self.indices), exc_info=error)
            for job in self.indices:
                job.future.set_exception(error)
            return
        self.batcher.batches += 1
        for job in list(self.indices):  # none should be left: every row ends with a token or is given up
            self.answer(job)

    def on_token(self, index: int, completion: Completion) -> None:
        """Each streaming job hears of its own rows (a callback that raises is dropped: the
        batch goes on, and that stream's handler gets the rest from the job's result)."""
        self.batcher.generated += 1
        job, row = self.rows[index]
        if job.on_token is not None:
            try:
                job.on_token(row, completion)
            except Exception as error:  # noqa: BLE001 - one client's stream, not the batch
                log.error("a streamed answer's callback failed; its stream ends", exc_info=error)
                job.on_token = None
        if completion.finish:
            self.ended[job][row] = completion
            if len(self.ended[job]) == job.row_count():
                self.answer(job)

    def answer(self, job: Job) -> None:
        """The job's answers (rows that did not end: "abort"); it leaves the batch's books."""
        rows, n = self.ended.pop(job), job.sampling.n
        for index in self.indices.pop(job):
            del self.rows[index]
        job.future.set_result([[rows.get(p * n + i, Completion(finish="abort")) for i in range(n)]
                               for p in range(len(job.prompts))])

    def poll(self, room: Room) -> Changes:
        """The changes at one of the engine's polls, told to the other ranks of a world:
        the rows of jobs whose client left (given up now: the engine ends them in this
        poll), and the rows of waiting jobs that join."""
        self.batcher.take()
        added = [row for job in self.joining(room) for row in job.rows()]
        gone = [job for job in self.indices if job.gone.is_set()]
        cancelled = [index for job in gone for index in self.indices[job]]
        for job in gone:
            self.answer(job)
        changes = {"cancel": cancelled, "add": [row_of(r) for r in added]}
        broadcast_message(self.batcher.rt, CALL, CHANGES, json.dumps(changes).encode())
        if gone:
            self.batcher.rt.log(f"serve: {len(gone)} request(s) given up in the running batch: their client left")
        return Changes(cancelled, added)

    def joining(self, room: Room) -> list[Job]:
        """Waiting jobs, in arrival order, while each one's rows fit the room. The first that
        does not waits for the batch's end, and the jobs behind it wait too: were they let
        in, the batch could run for ever with it waiting.
        Jobs whose client left while they waited are dropped on the way."""
        joining, waiting = [], self.batcher.waiting
        while self.batcher.join_running and waiting:
            if waiting[0].future.cancelled():
                waiting.pop(0)
                continue
            trial = replace(room)
            if not all(trial.take(row) for row in waiting[0].rows()):
                break
            job = waiting.pop(0)
            if job.future.set_running_or_notify_cancel():
                room = trial
                self.own(job)
                joining.append(job)
        return joining


def batch_body(rows: list[Request]) -> bytes:
    """One engine batch as every rank of a world receives it (JSON bytes, never pickle)."""
    return json.dumps([row_of(r) for r in rows]).encode()


def row_of(request: Request) -> list:
    """A request (with its rule and stop strings) as JSON, for the other ranks of a world."""
    rule = request.rule
    return [request.prompt, request.stream, request.max_new_tokens, rule.greedy, rule.temperature, rule.top_p,
            list(request.stops)]


def request_of(row: list) -> Request:
    prompt, stream, budget, greedy, temperature, top_p, stops = row
    return Request(prompt, stream, budget, Rule(greedy, temperature, top_p), tuple(stops))
