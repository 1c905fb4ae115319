"""Streamed answers (`stream: true`): the engine thread's per-token events carried to the
handler on the event loop, and each choice's text told in pieces, as server-sent events
(`data: {chunk}` ... `data: [DONE]`).

A piece is only text no later token can change, so the pieces of a choice add up to
exactly its non-streamed answer: held back are an incomplete UTF-8 tail (byte-level BPE
splits characters across tokens; the tail decodes to U+FFFD until its last byte comes),
an end that may begin a stop string (the answer is cut before a stop string) and trailing
whitespace (a chat answer is stripped; its leading whitespace is never told).

An unfinished answer's text is decoded incrementally, a few tokens at a time (as
incremental detokenizers do): the new tokens are decoded together with those of the
previous step, and their text is what that adds, so the work per event does not grow with
the answer. The window starts a step back because a SentencePiece-style tokenizer drops
the leading space of a text's first piece: it drops it in both decodings, so their
difference keeps it. This relies on the decoding of a prefix of the tokens being a prefix
of the decoding of all of them, up to an incomplete tail, as it is for byte-level and
byte-fallback tokenizers. A finished choice's text is decoded whole, once, by the
non-streamed answer's function, so the last piece ends the answer exactly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future

from offline_rlhf.generation.engine import Completion
from offline_rlhf.http import internal_error
from offline_rlhf.serving.protocol import Choice, chat_chunk, completion_chunk, openai_finish, stream_error, usage_chunk

DONE = b"data: [DONE]\n\n"
INCOMPLETE = "\ufffd"  # what an incomplete UTF-8 sequence decodes to
Event = tuple[int, int, str] | Future  # (row, its new token, its finish), or the job's future once done
log = logging.getLogger(__name__)


def sse(chunk: dict) -> bytes:
    return f"data: {json.dumps(chunk)}\n\n".encode()


class TokenEvents:
    """One streamed job's events: the engine calls it after each token of the job's rows
    (on the engine thread), the job's future reports its end, and the handler reads them
    on the event loop. Once closed (the stream ended, or the client went away) events are
    dropped and `gone` is set: the job's rows still running end at the engine's next
    cancellation poll."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.gone = threading.Event()

    def __call__(self, row: int, completion: Completion) -> None:
        self._put((row, completion.tokens[-1], completion.finish))  # one token per call: the handler appends it

    def job_done(self, future: Future) -> None:
        self._put(future)

    def _put(self, event: Event) -> None:
        if self.gone.is_set():
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is gone, nobody reads these
            self.gone.set()

    async def next(self) -> list[Event]:
        """Every event queued now, waiting for the first. The handler takes them together,
        so a slow reader tells fewer, longer pieces rather than falling behind."""
        events = [await self._queue.get()]
        while not self._queue.empty():
            events.append(self._queue.get_nowait())
        return events

    def close(self) -> None:
        self.gone.set()


class TextDeltas:
    """One choice's text, told in pieces that add up to `final(its completion)`, the text
    the non-streamed answer gives (see the module docstring); `decode` is the tokenizer's,
    the one `final` decodes with."""

    def __init__(self, final: Callable[[Completion], str], stops: Sequence[str],
                 decode: Callable[[list[int]], str]):
        self.final, self.stops, self.decode = final, stops, decode
        self.completion = Completion()
        self.prefix = self.read = 0  # decode tokens[prefix:]; what tokens[prefix:read] gave is in the text already
        self.held = ""  # text read, not told yet (see `settled`)
        self.told: list[str] = []  # the pieces
        self.told_chars = 0
        self.changed = False  # tokens came since the last take

    def add(self, token: int, finish: str) -> None:
        self.completion.tokens.append(token)
        self.completion.finish = finish
        self.changed = True

    def end_with(self, completion: Completion) -> None:
        """The choice's whole completion (from the job's result)."""
        self.completion, self.changed = completion, True

    def take(self) -> str:
        """The text settled since the last call (all that is left once the choice finished)."""
        if not self.changed:
            return ""
        self.changed = False
        if self.completion.finish:  # decoded whole once: exact however the tokenizer joins pieces
            piece = self.final(self.completion)[self.told_chars:]
        else:  # every token so far, no EOS among them, no stop string in their text
            self.held += self.new_text()
            piece = self.settle()
        if piece:
            self.told.append(piece)
            self.told_chars += len(piece)
        return piece

    def new_text(self) -> str:
        """The text the tokens since the last read add: "" while it ends in an incomplete
        character (those tokens are read again with the next)."""
        tokens = self.completion.tokens
        before, after = self.decode(tokens[self.prefix:self.read]), self.decode(tokens[self.prefix:])
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""
        self.prefix, self.read = self.read, len(tokens)
        return after[len(before):]

    def settle(self) -> str:
        """What no later token can change of the held text, taken from it; before the
        first piece, without the leading whitespace if `final` drops it."""
        piece = settled(self.held, self.stops)
        self.held = self.held[len(piece):]
        if piece and not self.told and piece[0].isspace() and not self.keeps_leading_space():
            piece = piece.lstrip()
        return piece

    def keeps_leading_space(self) -> bool:
        """Whether `final` keeps an answer's leading whitespace (a completion does, a chat
        answer does not), asked once, of the tokens read so far (the whitespace and the
        first piece's text)."""
        return self.final(Completion(self.completion.tokens[:self.read]))[:1].isspace()


def settled(text: str, stops: Sequence[str]) -> str:
    """What no later token can change of an unfinished answer's text (read up to a whole
    character): all but an end that may begin a stop string, and trailing whitespace."""
    return text[:len(text) - stop_start(text, stops)].rstrip()


def stop_start(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that begins a stop string (0: none)."""
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


class StreamedAnswer:
    """A streamed chat (`chat`) or completions answer's events: for chat, each choice's
    role first; then each choice's pieces, choices interleaved as their tokens come, a
    choice's last chunk carrying its finish_reason; when `prompt_tokens` is given (the usage
    was asked for), a last chunk with the usage; then [DONE]. All chunks share `head`."""

    def __init__(self, head: dict, texts: list[TextDeltas], chat: bool, prompt_tokens: int | None):
        self.head, self.texts, self.chat, self.prompt_tokens = head, texts, chat, prompt_tokens

    def chunk(self, row: int, text: str, finish: str) -> dict:
        reason = openai_finish(finish) if finish else None
        if self.chat:
            return chat_chunk(self.head, row, {"content": text} if text else {}, reason)
        return completion_chunk(self.head, row, text, reason)

    def opening(self) -> list[dict]:
        return [chat_chunk(self.head, row, {"role": "assistant", "content": ""}, None)
                for row in range(len(self.texts))] if self.chat else []

    def closing(self) -> list[dict]:
        if self.prompt_tokens is None:
            return []
        choices = [Choice("".join(t.told), openai_finish(t.completion.finish), len(t.completion.tokens))
                   for t in self.texts]
        return [usage_chunk(self.head, self.prompt_tokens, choices)]

    async def body(self, events: TokenEvents, first: list[Event]) -> AsyncIterator[bytes]:
        """The events from the job's first (already taken) on. A batch that fails now ends
        the stream with an error event (naming an error id, as a 500 does); the stream
        stopping early (the client left) closes `events`."""
        try:
            for chunk in self.opening():
                yield sse(chunk)
            pending, batch = set(range(len(self.texts))), first
            while pending:
                failed = self.apply(batch, pending)
                if failed is not None:
                    yield sse(stream_error(internal_error(log, "a streamed answer", failed)))
                    break
                for row in sorted(pending):
                    text, finish = self.texts[row].take(), self.texts[row].completion.finish
                    if text or finish:
                        yield sse(self.chunk(row, text, finish))
                    if finish:
                        pending.discard(row)
                if pending:
                    batch = await events.next()
            else:  # every choice finished (not after a failure)
                for chunk in self.closing():
                    yield sse(chunk)
            yield DONE
        finally:
            events.close()

    def apply(self, batch: list[Event], pending: set[int]) -> BaseException | None:
        """Add a batch of events to the choices' texts; the batch's error if it failed."""
        for event in batch:
            if not isinstance(event, Future):
                row, token, finish = event
                self.texts[row].add(token, finish)
            elif event.exception() is not None:
                return event.exception()
            else:  # the job's end: its completions are final (any that a dropped callback missed too)
                done = [c for per_prompt in event.result() for c in per_prompt]
                for row in pending:
                    self.texts[row].end_with(done[row])
        return None
