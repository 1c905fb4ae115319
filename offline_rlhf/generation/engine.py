"""Continuous-batching generation with a per-slot KV cache.

A fixed number of decode slots (`GenerationConfig.batch_size`) each hold one sequence.
Every step decodes one token for every busy slot; a sequence that ends (EOS, a stop
condition, or its own `max_new_tokens`) frees its slot at once, and the next request is
prefilled into it, so the batch stays full until the queue runs dry. Then the last busy
slot moves into the freed one, so decode steps only ever run over slots 0..busy-1.

Requests with the same prompt admitted together share one prefill: the prompt's cache
columns are copied to the other slots (the n samples of a prompt). Positions restart at 0
at each prompt's first token and each slot attends to its own columns only, so
a row's tokens do not depend on what it is batched with; sampling draws from uniforms
keyed by (seed, stream, step), so sampled tokens do not either (`sampling.keyed_uniforms`).

Tensor parallelism works from outside: every TP rank runs this same loop, gets the same
(all-gathered) logits and keys, and so picks the same tokens; each rank caches its own KV
heads. Build the model with sequence_parallel and loss_parallel off.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.generation.decode import DynamicStep, StaticStep, bucket_width, decode_step_for
from offline_rlhf.generation.kv_cache import LayerKVCache, PromptWrite, new_cache
from offline_rlhf.generation.sampling import NOT_FINITE, RowRules, Rule, keyed_uniforms, sample_next, stream_id
from offline_rlhf.models.llama import Transformer
from offline_rlhf.runtime import autocast_for


@dataclass(frozen=True)
class Request:
    prompt: Sequence[int]  # token ids: a list, or `TokenIds` (4 bytes a token: generate holds a replica's share)
    stream: int  # the sampling stream: `stream_id(prompt id, sample index)`
    max_new_tokens: int
    rule: Rule | None = None  # how this request picks tokens; None: the run's cfg (greedy, temperature, top_p)
    stops: tuple[str, ...] | None = None  # strings that end its answer; None: the run's cfg.stop


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)  # ends with the EOS token when one ended it
    finish: str = ""  # "eos", "stop", "length", or "abort" (a `run`'s poll cancelled it)


@dataclass
class Slot:
    request: int  # index into the requests
    start: int  # first cache column of the prompt (prompts of one prefill are left-padded)
    end: int  # the column the next token's k, v go to


@dataclass
class EngineStats:
    """Counters of work done, not time, for a caller that passes one to `run` (the tests
    check slot reuse and shared prefills with them; production passes none)."""

    prefills: int = 0  # prefill forward passes
    prompts_prefilled: int = 0  # distinct prompts computed (shared n-sample prefixes count once)
    decode_steps: int = 0
    admissions: int = 0  # requests placed into a slot: more than the slot count means slots were reused
    graphs: int = 0  # CUDA graphs captured (one per bucketed decode shape)


StopCheck = Callable[[list[int]], bool]  # a request's tokens so far -> has it reached a stop string
Decode = Callable[[list[int]], str]  # token ids -> text
TokenCallback = Callable[[int, "Completion"], None]
POLL_STEPS = 8  # a run's `poll` is asked once per this many decode steps (a collective in a TP world)


@dataclass(frozen=True)
class Changes:
    """What a run's caller tells the engine at a poll."""

    cancelled: Collection[int] = ()  # request indices to end now (finish "abort")
    added: Sequence[Request] = ()  # requests joining the run, indexed after its others in this order


@dataclass
class Room:
    """A run's cache columns, and the longest prompt and largest budget among its requests:
    a slot needs the columns of the longest prompt it was prefilled with plus its budget."""

    columns: int
    longest: int = 0
    largest_budget: int = 0

    def take(self, request: Request) -> bool:
        """Whether the request fits beside the others; if so it is counted."""
        longest, budget = max(self.longest, len(request.prompt)), max(self.largest_budget, request.max_new_tokens)
        if longest + budget > self.columns:
            return False
        self.longest, self.largest_budget = longest, budget
        return True


Poll = Callable[[Room], Changes]  # given (a copy of) the run's room


def stop_on_strings(decode: Decode, stops: Sequence[str]) -> StopCheck | None:
    """A StopCheck for stop strings that decodes only an answer's tail: a string of c
    characters spans at most 4c byte-level tokens (every token holds at least one byte)."""
    if not stops:
        return None
    tail = 4 * max(map(len, stops)) + 1
    return lambda tokens: any(stop in decode(tokens[-tail:]) for stop in stops)


def answer_text(completion: Completion, decode: Decode, stops: Sequence[str]) -> str:
    """An answer's text: without its EOS token and without anything from a stop string on."""
    tokens = completion.tokens[:-1] if completion.finish == "eos" else completion.tokens
    return cut_at_stop(decode(tokens), stops).strip()


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string it holds (OpenAI's convention: not kept)."""
    cuts = [text.find(stop) for stop in stops if stop in text]
    return text[:min(cuts)] if cuts else text


def generate(model: Transformer, prompts: list[list[int]], cfg: GenerationConfig, eos_id: int | Collection[int] | None,
             pad_id: int, device: torch.device | str, prompt_ids: list[int] | None = None) -> list[list[int]]:
    """The new tokens of each prompt (n=1), in input order; a response ends with its EOS
    token when the model emitted one. `prompt_ids` key the sampling streams (default:
    the position in `prompts`), so a prompt samples the same answer in any batch."""
    prompt_ids = range(len(prompts)) if prompt_ids is None else prompt_ids
    requests = [Request(p, stream_id(i, 0), cfg.max_new_tokens) for p, i in zip(prompts, prompt_ids)]
    return [c.tokens for c in run(model, requests, cfg, eos_id, pad_id, device)]


def run(model: Transformer, requests: list[Request], cfg: GenerationConfig, eos_id: int | Collection[int] | None,
        pad_id: int, device: torch.device | str, decode: Decode | None = None,
        stats: EngineStats | None = None, static: bool | None = None,
        on_token: TokenCallback | None = None, session: DecodeSession | None = None,
        keep_tokens: bool = True, poll: Poll | None = None) -> list[Completion]:
    """One completion per request, in request order. `eos_id` None never stops early.
    `decode` turns tokens into text for the stop strings (each request's, or cfg.stop):
    needed when there are any.
    `static`: decode at bucketed shapes (default: on CUDA, as CUDA graphs; see `decode`).
    `session`: a cache and decode step kept from earlier runs of `model` (default: new ones
    for `device`, `static` and `cfg`'s decode settings; a session brings its own).
    `on_token(request index, completion)` runs after each token a request gets (streaming);
    the completion's `finish` is set on its last. `keep_tokens=False` drops a completion's
    tokens once `on_token` has had its last (the returned completions then hold finish
    reasons only): a long run then holds only the answers in flight.
    `poll(room)`, asked every POLL_STEPS decode steps, changes a running batch (a server's):
    requests it cancels end at once (their slots are freed, queued ones never start; finish
    "abort"), and requests it adds (each taken by the room, in order) queue for the next
    free slot. With a poll the run has all `cfg.batch_size` slots. In a TP world
    it must give the same changes on every rank."""
    _check(model, requests, decode, cfg)
    eos_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    session = session or DecodeSession(model, device, cfg, static)
    if session.model is not model or session.device != torch.device(device):
        raise ValueError(f"a DecodeSession serves the model and device ({session.device}) it was made for")
    engine = _Engine(model, requests, cfg, eos_ids, pad_id, decode, stats or EngineStats(), session, on_token,
                     keep_tokens, poll)
    with torch.inference_mode(), autocast_for(engine.device):
        engine.run()
    return engine.completions


def _check(model: Transformer, requests: Sequence[Request], decode: Decode | None, cfg: GenerationConfig) -> None:
    for request in requests:
        if decode is None and _stops(request, cfg):
            raise ValueError("stop strings need a `decode` (token ids -> text) to be checked")
        if not request.prompt:
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        if len(request.prompt) + request.max_new_tokens > model.cfg.max_seq_len:
            raise ValueError(f"a prompt of {len(request.prompt)} tokens + max_new_tokens={request.max_new_tokens} "
                             f"exceeds the model's max_seq_len={model.cfg.max_seq_len}")


def _stops(request: Request, cfg: GenerationConfig) -> tuple[str, ...]:
    return tuple(cfg.stop) if request.stops is None else request.stops


class DecodeSession:
    """A KV cache and decode step kept across engine runs of one model (a server's batches,
    the PPO actor's iterations), so the CUDA graphs one run captures are replayed by the
    next. It grows (a new cache, graphs captured again) when a run needs more slots or
    columns than it has; columns come in whole width buckets, so runs of similar lengths
    fit one. Its `cfg`'s decode settings (cuda_graphs, compile, compile_mode,
    decode_attention) hold for every run; `static` as in `run`."""

    def __init__(self, model: Transformer, device: torch.device | str, cfg: GenerationConfig,
                 static: bool | None = None):
        self.model, self.device, self.cfg, self.static = model, torch.device(device), cfg, static
        self.slots = self.width = 0
        self.cache: list[LayerKVCache] = []
        self.step: DynamicStep | StaticStep | None = None

    def fit(self, slots: int, width: int) -> tuple[list[LayerKVCache], DynamicStep | StaticStep]:
        """The cache and step for a run of `slots` slots over `width` columns."""
        if slots > self.slots or width > self.width:
            self.slots, self.width = max(slots, self.slots), max(bucket_width(width), self.width)
            # One spare slot and column: no decode bucket then equals the cache's size, which
            # a compiled step would specialize on (a compilation more for each coincidence).
            self.cache = new_cache(len(self.model.layers), self.slots + 1, self.width + 1)
            self.step = decode_step_for(self.model, self.cache, (self.slots, self.width), self.device, self.cfg,
                                        self.static)
        return self.cache, self.step


class _Engine:
    def __init__(self, model, requests, cfg, eos_ids, pad_id, decode, stats, session, on_token, keep_tokens,
                 poll):
        self.model, self.cfg, self.eos_ids = model, cfg, eos_ids
        self.requests: list[Request | None] = list(requests)  # None once ended, without keep_tokens
        self.pad_id, self.device, self.decode, self.stats = pad_id, session.device, decode, stats
        self.stop_checks: dict[tuple[str, ...], StopCheck | None] = {}  # per set of stop strings
        self.on_token: TokenCallback | None = on_token
        self.keep_tokens, self.poll = keep_tokens, poll
        self.rule = Rule.of(cfg)  # of the requests that bring none
        self.iterations = 0  # of the decode loop, counted alike on every TP rank (when `poll` is asked)
        self.completions = [Completion() for _ in requests]
        # Longest prompts first: an out-of-memory slot count shows up at once.
        self.queue = deque(sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt)))
        self.slots: list[Slot] = []  # busy slots are 0..len-1
        self.pending: list[int] = []  # per busy slot: the token to feed next
        # Prompts of one prefill are left-padded to the longest, so a slot may need columns
        # for the longest prompt plus the largest budget.
        longest = max((len(r.prompt) for r in requests), default=0)
        largest_budget = max((r.max_new_tokens for r in requests), default=1)
        self.slot_count = cfg.batch_size if poll else max(1, min(cfg.batch_size, len(requests)))
        self.cache, self.step = session.fit(self.slot_count, longest + largest_budget)
        self.room = Room(session.width, longest, largest_budget)
        self.captured_before = self.graphs_captured()
        self.changed = True  # the slots changed since the step's inputs were loaded
        # Per busy slot, loaded with the step's inputs (`sampling_keys`).
        self.streams: torch.Tensor | None = None
        self.steps: torch.Tensor | None = None
        self.rules: RowRules | None = None

    def run(self) -> None:
        """Decode until every request has ended, one step ahead: step t+1 is launched from
        the tokens step t left on the device before the host reads them, so on a GPU the
        host's work (stop checks, callbacks) overlaps the device's (on a CPU it costs the
        step ahead of the rows that end, nothing else). When a row ends, the step ahead's
        tokens still count for the other rows; then slots change and the next step starts
        from the host's state."""
        self.admit()
        ahead = None
        while self.slots:
            current = ahead if ahead is not None else self.launch()
            ahead = self.launch()
            finished = self.advance(range(len(self.slots)), current.tokens())
            finished += self.changes(finished)
            if finished or (self.queue and self.free_slots()):
                survivors = [i for i in range(len(self.slots)) if i not in finished]
                tokens = ahead.tokens()
                finished += self.advance(survivors, [tokens[i] for i in survivors])
                ahead = None
                self.release(finished)
                self.admit()
        self.stats.graphs += self.graphs_captured() - self.captured_before

    def graphs_captured(self) -> int:
        return len(self.step.captured) if isinstance(self.step, StaticStep) else 0

    def admit(self) -> None:
        """Fill free slots from the queue (again while requests end at their first token)."""
        while self.queue and self.free_slots():
            taken = [self.queue.popleft() for _ in range(min(len(self.queue), self.free_slots()))]
            first = len(self.slots)
            self.prefill(taken)
            self.release(self.advance(range(first, len(self.slots)), self.pending[first:]))

    def free_slots(self) -> int:
        return self.slot_count - len(self.slots)

    def prefill(self, taken: list[int]) -> None:
        """Prompts of `taken` into the next free slots, each distinct prompt computed once
        and its columns copied to the slots of its other samples. Each new slot's pending
        token is its first sampled token."""
        first = len(self.slots)
        rows, row_of, computed_in = [], {}, []  # per request: its prefill row; per row: its slot
        for offset, index in enumerate(taken):
            prompt = tuple(self.requests[index].prompt)
            if prompt not in row_of:
                row_of[prompt] = len(computed_in)
                computed_in.append(first + offset)
            rows.append(row_of[prompt])
        tokens, real = left_pad([list(p) for p in row_of], self.pad_id, self.device)
        width = tokens.shape[1]
        writes = [PromptWrite(layer, torch.tensor(computed_in, device=self.device)) for layer in self.cache]
        logits = self.model(tokens, (real.cumsum(1) - 1).clamp(min=0), prefill_mask(real), cache=writes,
                            last_only=True)[:, -1]
        for offset, (index, row) in enumerate(zip(taken, rows)):
            if computed_in[row] != first + offset:
                for layer in self.cache:
                    layer.copy_slot(computed_in[row], first + offset, width)
            self.slots.append(Slot(index, width - len(self.requests[index].prompt), width))
        self.stats.prefills += 1
        self.stats.prompts_prefilled += len(computed_in)
        self.stats.admissions += len(taken)
        self.pending += self.sample(logits[torch.tensor(rows, device=self.device)], *self.sampling_keys(taken)).tolist()
        self.changed = True

    def launch(self) -> TokenRead:
        """Start one decode step of every busy slot (from the host's state after the slots
        changed, else from what the last step left on the device); its tokens come later."""
        if self.changed:
            self.step.load([(token, slot.end, slot.start) for token, slot in zip(self.pending, self.slots)])
            self.streams, self.steps, self.rules = self.sampling_keys([slot.request for slot in self.slots])
            self.changed = False
        logits = self.step.logits(max(slot.end for slot in self.slots) + 1)
        tokens = self.sample(logits, self.streams, self.steps, self.rules)
        self.step.feed(tokens.clamp(min=0))  # a NOT_FINITE row feeds token 0 ahead; `advance` refuses it
        self.steps += 1
        for slot in self.slots:
            slot.end += 1
        self.stats.decode_steps += 1
        return TokenRead(tokens)

    def sampling_keys(self, request_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, RowRules]:
        """Per request: its sampling stream, its step (tokens so far) and its rule."""
        streams = torch.tensor([self.requests[i].stream for i in request_indices], device=self.device)
        steps = torch.tensor([len(self.completions[i].tokens) for i in request_indices], device=self.device)
        rules = [self.requests[i].rule or self.rule for i in request_indices]
        return streams, steps, RowRules(rules, self.device)

    def sample(self, logits: torch.Tensor, streams: torch.Tensor, steps: torch.Tensor, rules: RowRules) -> torch.Tensor:
        """The next token of each row by its rule, its uniform keyed by (seed, stream, step)."""
        uniforms = None if rules.all_greedy else keyed_uniforms(self.cfg.seed, streams, steps)
        return sample_next(logits, self.cfg, uniforms, rules)

    def advance(self, slot_indices: Iterable[int], tokens: list[int]) -> list[int]:
        """Append each slot's new token; returns the slots whose request has ended."""
        finished = []
        for slot_index, token in zip(slot_indices, tokens):
            request = self.slots[slot_index].request
            completion = self.completions[request]
            if token == NOT_FINITE:  # every TP rank has the same logits, so all raise here
                raise FloatingPointError(f"the model's logits for request {request} are not finite (NaN or inf) "
                                         f"at its token {len(completion.tokens)}")
            completion.tokens.append(token)
            self.pending[slot_index] = token
            completion.finish = self._finish(completion.tokens, self.requests[request])
            if self.on_token is not None:
                self.on_token(request, completion)
            if completion.finish:
                finished.append(slot_index)
                self._ended(request, completion.finish)
        return finished

    def changes(self, finished: list[int]) -> list[int]:
        """Every POLL_STEPS iterations: the poll's changes. Returns the busy slots it
        cancelled that were not already `finished`."""
        self.iterations += 1
        if self.poll is None or self.iterations % POLL_STEPS:
            return []
        changes = self.poll(replace(self.room))
        self.add(changes.added)
        return self.cancel(set(changes.cancelled), finished)

    def add(self, requests: Sequence[Request]) -> None:
        """Queue requests joining the run (after the queued ones: first come, first served)."""
        _check(self.model, requests, self.decode, self.cfg)
        for request in requests:
            if not self.room.take(request):
                raise ValueError("a request added to a run must fit its room (see Room.take)")
            self.queue.append(len(self.requests))
            self.requests.append(request)
            self.completions.append(Completion())

    def cancel(self, gone: set[int], finished: list[int]) -> list[int]:
        """End the requests `gone` names: queued ones never start, running ones' slots (those
        not `finished` anyway) are returned to be freed."""
        if not gone:
            return []
        for request in gone.intersection(self.queue):
            self._ended(request, "abort")
        self.queue = deque(request for request in self.queue if request not in gone)
        aborted = [index for index, slot in enumerate(self.slots) if slot.request in gone and index not in finished]
        for index in aborted:
            self._ended(self.slots[index].request, "abort")
        return aborted

    def _ended(self, request: int, finish: str) -> None:
        """Without keep_tokens the request and its tokens are forgotten (a server's batch
        may run for ever)."""
        self.completions[request].finish = finish
        if not self.keep_tokens:
            self.completions[request] = Completion(finish=finish)
            self.requests[request] = None

    def _finish(self, tokens: list[int], request: Request) -> str:
        if tokens[-1] in self.eos_ids:
            return "eos"
        stop = self._stop_check(_stops(request, self.cfg))
        if stop is not None and stop(tokens):
            return "stop"
        return "length" if len(tokens) >= request.max_new_tokens else ""

    def _stop_check(self, stops: tuple[str, ...]) -> StopCheck | None:
        if stops not in self.stop_checks:
            self.stop_checks[stops] = stop_on_strings(self.decode, stops)
        return self.stop_checks[stops]

    def release(self, slot_indices: list[int]) -> None:
        """Free slots; the last busy slot moves into each, so busy slots stay 0..busy-1."""
        for slot_index in sorted(slot_indices, reverse=True):
            last = len(self.slots) - 1
            if slot_index != last:
                moved = self.slots[last]
                for layer in self.cache:
                    layer.copy_slot(last, slot_index, moved.end)
                self.slots[slot_index] = moved
                self.pending[slot_index] = self.pending[last]
            self.slots.pop()
            self.pending.pop()
            self.changed = True


class TokenRead:
    """A step's tokens [busy], on their way to the host: on CUDA copied into pinned memory
    behind the step, so reading them waits for that step only, not for one launched since."""

    def __init__(self, tokens: torch.Tensor):
        self.host, self.event = tokens, None
        if tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def tokens(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] right-aligned, and [B, T] bool True at real tokens."""
    width = max(map(len, prompts))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        real[row, width - len(prompt):] = True
    return tokens.to(device), real.to(device)


def prefill_mask(real: torch.Tensor) -> torch.Tensor:
    """real: [B, T] -> [B, 1, T, T] bool: causal, no padding keys. Each position may also
    attend to itself, so padding queries never have an all-False row (softmax over nothing
    gives NaN, which would reach real tokens through the cached values at those slots)."""
    width = real.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
    itself = torch.eye(width, dtype=torch.bool, device=real.device)
    return ((causal & real[:, None, :]) | itself).unsqueeze(1)
