"""A streamed choice's text told in pieces, with the real byte-level tokenizer: the pieces
add up to exactly the non-streamed answer, an incomplete UTF-8 character and a possible
beginning of a stop string are held back until resolved, and trailing whitespace waits.
Also: a batch's token callback routes rows to their jobs and drops a failing one, and a
stream ends from the job's result or with its error."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Future

import pytest

from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.generation.engine import Completion, answer_text, stop_on_strings
from offline_rlhf.serving.batcher import Job, token_callback
from offline_rlhf.serving.protocol import Sampling, answer_head
from offline_rlhf.serving.server import completion_text
from offline_rlhf.serving.stream import StreamedAnswer, TextDeltas, TokenEvents, settled
from tests.unit.serving.tiny import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(make_tokenizer(tmp_path_factory.mktemp("stream") / "tokenizer"))


def pieces(tokenizer: Tokenizer, text: str, stops: tuple[str, ...] = (), chat: bool = False) -> tuple[list[str], str]:
    """`text`'s tokens told one at a time, finishing where the engine's stop check says so
    (else at the last token, "length"): the piece after each token, and the answer the
    non-streamed request gives for the same tokens."""
    final_text = answer_text if chat else completion_text
    deltas = TextDeltas(lambda c: final_text(c, tokenizer.decode, stops), stops)
    ids, stop = tokenizer.encode(text), stop_on_strings(tokenizer.decode, stops)
    told = []
    for step, token in enumerate(ids):
        tokens = ids[:step + 1]
        finish = "stop" if stop and stop(tokens) else "length" if step == len(ids) - 1 else ""
        deltas.add(token, finish)
        told.append(deltas.take())
        if finish:
            return told, final_text(Completion(tokens, finish), tokenizer.decode, stops)
    raise AssertionError("unreachable: the last token finishes")


def test_a_character_split_across_tokens_is_told_once_its_last_byte_came(tokenizer):
    text = "Sure: apple 你好 river stone."
    ids = tokenizer.encode(text)
    assert [tokenizer.decode([i]) for i in ids[7:13]] == ["\ufffd"] * 6  # each byte of 你好 is a token
    told, answer = pieces(tokenizer, text)
    assert "".join(told) == answer == text
    # The space waits for what follows it; each character for its third byte.
    assert told[6:13] == ["", "", "", " 你", "", "", "好"]
    assert not any("\ufffd" in piece for piece in told)


def test_a_stop_string_split_across_tokens_is_never_told(tokenizer):
    text = "good apple END of it"  # tokens: g, ood, " apple", " ", E, N, D, ...
    told, answer = pieces(tokenizer, text, stops=("apple END",))
    assert told == ["g", "ood", "", "", "", "", " "]  # " apple" waited as a stop string's beginning
    assert "".join(told) == answer == "good "
    chat_told, chat_answer = pieces(tokenizer, text, stops=("apple END",), chat=True)
    assert "".join(chat_told) == chat_answer == "good"  # the chat answer is stripped: the space never came


def test_a_stop_prefix_that_turns_out_not_to_be_one_is_told_then(tokenizer):
    text = "good apple END of it"
    told, answer = pieces(tokenizer, text, stops=("apple pie", "xyz"))
    assert told[2:5] == ["", "", " apple E"]  # " apple" and " apple " might have begun "apple pie"
    assert "".join(told) == answer == text


def test_a_chat_answer_is_stripped_at_both_ends_as_unstreamed(tokenizer):
    text = "  good apple  "
    told, answer = pieces(tokenizer, text, chat=True)
    assert "".join(told) == answer == "good apple"
    assert told[0] == "" and told[-1] == ""  # leading and trailing whitespace never told


@pytest.mark.parametrize("text, stops, expected", [
    ("abc\ufffd", (), "abc"), ("abc \ufffd\ufffd", (), "abc"), ("abc EN", ("END",), "abc"),
    ("abc ENx", ("END",), "abc ENx"), ("abc\n", ("\nUser:",), "abc"), ("abc\nUs", ("\nUser:", "s"), "abc"),
    ("ab", ("abc",), ""), ("ab\ufffdcd", (), "ab\ufffdcd"),
])
def test_settled_holds_back_only_what_a_later_token_may_change(text, stops, expected):
    assert settled(text, stops) == expected


def test_a_batchs_callback_routes_rows_to_their_jobs_and_drops_one_that_fails():
    heard = []

    def failing(row, completion):
        raise RuntimeError("client gone")

    sampling = Sampling(temperature=1.0, top_p=1.0, n=2, max_tokens=4, stop=(), seed=0)
    jobs = [Job([[1], [2]], [4, 4], sampling, on_token=lambda row, c: heard.append(("a", row, c.tokens[-1]))),
            Job([[3]], [4], sampling, on_token=failing), Job([[4]], [4], sampling),
            Job([[5]], [4], sampling, on_token=lambda row, c: heard.append(("d", row, c.tokens[-1])))]
    callback = token_callback(jobs)
    for index in range(9):  # rows: a 0-3, b 4-5, c 6-7 (not streamed), d 8-9
        callback(index, Completion([100 + index]))
    callback(9, Completion([109]))
    assert heard == [("a", 0, 100), ("a", 1, 101), ("a", 2, 102), ("a", 3, 103), ("d", 0, 108), ("d", 1, 109)]
    assert jobs[1].on_token is None  # dropped after its first failure; the batch went on
    assert token_callback([jobs[2]]) is None  # nothing streams: the engine runs without a callback


def streamed(tokenizer: Tokenizer, first_token: Completion, then: list, prompt_tokens: int | None) -> list:
    """A one-choice completions answer's events (JSON, or [DONE]) when the engine reports
    `first_token`, and once the stream began, the events `then`."""
    async def read() -> list[bytes]:
        events = TokenEvents(asyncio.get_running_loop())
        events(0, first_token)
        first = await events.next()
        for event in then:
            events.job_done(event) if isinstance(event, Future) else events(0, event)
        deltas = [TextDeltas(lambda c: completion_text(c, tokenizer.decode, ()), ())]
        answer = StreamedAnswer(answer_head("m", "text_completion"), deltas, chat=False, prompt_tokens=prompt_tokens)
        told = [chunk async for chunk in answer.body(events, first)]
        assert events.closed
        return told

    told = asyncio.run(read())
    assert all(chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") for chunk in told)
    return [chunk[6:-2].decode() if chunk == b"data: [DONE]\n\n" else json.loads(chunk[6:]) for chunk in told]


def test_a_stream_whose_token_events_stopped_ends_with_the_jobs_result(tokenizer):
    ids = tokenizer.encode("good apple river")
    done = Future()
    done.set_result([[Completion(ids, "length")]])
    told = streamed(tokenizer, Completion(ids[:1]), [done], prompt_tokens=3)  # only the first token was heard
    assert [c["choices"][0]["text"] for c in told[:2]] == ["g", "ood apple river"]
    assert told[1]["choices"][0]["finish_reason"] == "length"
    assert told[2]["choices"] == [] and told[2]["usage"] == {"prompt_tokens": 3, "completion_tokens": len(ids),
                                                             "total_tokens": 3 + len(ids)}
    assert told[3:] == ["[DONE]"]


def test_an_error_event_ends_a_stream_whose_batch_failed(tokenizer):
    failed = Future()
    failed.set_exception(RuntimeError("CUDA error: an illegal memory access"))
    told = streamed(tokenizer, Completion(tokenizer.encode("good")[:1]), [failed], prompt_tokens=3)
    assert told[0]["choices"][0]["text"] == "g"
    assert told[1] == {"error": {"message": "RuntimeError: CUDA error: an illegal memory access",
                                 "type": "server_error", "param": None, "code": None}}
    assert told[2:] == ["[DONE]"]  # and no usage chunk
