"""A streamed choice's text told in pieces, with real tokenizers (byte-level BPE, and a
SentencePiece-style byte-fallback one built here: none is stored locally): the pieces add
up to exactly the non-streamed answer, an incomplete UTF-8 character and a possible
beginning of a stop string are held back until resolved, and trailing whitespace waits;
the text is decoded incrementally (decoded tokens grow linearly with the answer).
Also: a batch's token callback routes rows to their jobs and drops a failing one, and a
stream ends from the job's result or with its error."""

from __future__ import annotations

import asyncio
import itertools
import json
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, trainers

from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.generation.engine import Completion, Room, answer_text, stop_on_strings
from offline_rlhf.serving.batcher import Job, RunningBatch
from offline_rlhf.serving.protocol import Sampling, answer_head
from offline_rlhf.serving.server import completion_text
from offline_rlhf.serving.stream import StreamedAnswer, TextDeltas, TokenEvents, settled
from tests.synthetic_preferences import preference_records
from tests.unit.serving.tiny import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(make_tokenizer(tmp_path_factory.mktemp("stream") / "tokenizer"))


def tell(tokenizer: Tokenizer, ids: list[int], finish: str, stops: tuple[str, ...], chat: bool,
         batches: list[int], decode=None) -> tuple[list[str], str]:
    """`ids` told in event batches of the sizes `batches` cycles through, finishing as the
    engine would (at the token that completes a stop string, else after the last, with
    `finish`; "eos" adds the EOS token): the pieces, and the non-streamed answer."""
    decode = decode or tokenizer.decode
    final_text = answer_text if chat else completion_text
    deltas = TextDeltas(lambda c: final_text(c, decode, stops), stops, decode)
    ids = ids + [tokenizer.eos_id] if finish == "eos" else ids
    stop, told, sizes = stop_on_strings(tokenizer.decode, stops), [], itertools.cycle(batches)
    step = 0
    while not deltas.completion.finish:
        for _ in range(next(sizes)):
            tokens = ids[:step + 1]
            ends = "stop" if stop and stop(tokens) else finish if step == len(ids) - 1 else ""
            deltas.add(ids[step], ends)
            step += 1
            if ends:
                break
        told.append(deltas.take())
    return told, final_text(deltas.completion, tokenizer.decode, stops)


def pieces(tokenizer: Tokenizer, text: str, stops: tuple[str, ...] = (), chat: bool = False) -> tuple[list[str], str]:
    """`text`'s tokens told one at a time: the piece after each token, and the answer."""
    return tell(tokenizer, tokenizer.encode(text), "length", stops, chat, [1])


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


def sentencepiece_tokenizer() -> Tokenizer:
    """A SentencePiece-style (Llama 2) tokenizer: words carry a leading "▁", characters
    outside its ASCII vocabulary fall back to byte tokens <0xXX>, and decoding drops the
    leading space of the text's first piece."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    lines = [" ".join(r.values()) for r in preference_records(100, seed=5)] + ["User: Assistant: Sure, the END."]
    backend.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>"],
                                                          show_progress=False))
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return Tokenizer(BackendTokenizer.from_str(json.dumps(spec)), {"eos_token": "</s>"})


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def any_tokenizer(request, tokenizer) -> Tokenizer:
    return tokenizer if request.param == "byte_level" else sentencepiece_tokenizer()


# Multi-byte characters (CJK, emoji, a ZWJ sequence, accents) that both tokenizers split into
# byte tokens, runs of whitespace, and near-misses of the stop strings below.
LONG = "".join(f"  Sure {i} 🙂: 你好世界, naïve café; 👩‍💻 writes\n\n\tgood apple EN river \nUs stone 日本語 🎉🎉  "
               for i in range(40))


def test_both_tokenizers_split_characters_into_bytes(any_tokenizer):
    ids = any_tokenizer.encode(LONG)
    alone = [any_tokenizer.decode([i]) for i in ids]
    assert alone.count("\ufffd") > 100  # bytes of one character, each an incomplete sequence alone
    assert "".join(alone) != any_tokenizer.decode(ids)  # so decoding token by token is wrong


def test_the_sentencepiece_style_tokenizer_drops_the_leading_space_of_a_texts_first_piece():
    tokenizer = sentencepiece_tokenizer()
    ids = tokenizer.encode("good apple")
    assert tokenizer.backend.encode("good apple", add_special_tokens=False).tokens == ["\u2581good", "\u2581apple"]
    assert tokenizer.decode(ids) == "good apple" and tokenizer.decode(ids[1:]) == "apple"


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
@pytest.mark.parametrize("finish, stops", [("length", ()), ("eos", ("xyz",)), ("length", ("\nUser:", "END"))])
@pytest.mark.parametrize("batches", [[1], [3, 1, 7, 2, 1, 1, 5]], ids=["token_by_token", "uneven"])
def test_the_pieces_of_a_long_answer_add_up_to_the_unstreamed_answer(any_tokenizer, chat, finish, stops, batches):
    told, answer = tell(any_tokenizer, any_tokenizer.encode(LONG + "\nUser: and then  \n"), finish, stops, chat,
                        batches)
    assert "".join(told) == answer
    assert len(answer) > len(LONG) * 0.9 and "\ufffd" not in answer
    assert ("\nUser:" in answer) == ("\nUser:" not in stops)  # cut at the stop string
    assert not any("\ufffd" in piece for piece in told)
    assert not any(piece[-1].isspace() for piece in told[:-1] if piece)  # whitespace waits for what follows
    assert (told[-1][-1:].isspace(), next(piece for piece in told if piece)[0].isspace()) == (not chat, not chat)


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_the_decoded_tokens_grow_linearly_with_the_answer(any_tokenizer, chat):
    decoded = []

    def counting_decode(ids: list[int]) -> str:
        decoded.append(len(ids))
        return any_tokenizer.decode(ids)

    ids = any_tokenizer.encode(LONG * 10)[:2000]
    assert len(ids) == 2000
    told, answer = tell(any_tokenizer, ids, "length", ("\nUser:",), chat, [1], decode=counting_decode)
    assert "".join(told) == answer
    # Decoding the whole answer at each of its 2,000 events would be ~2,000,000 tokens.
    assert sum(decoded) < 10 * len(ids) and len(decoded) < 3 * len(ids)
    assert max(decoded[:-1]) < 20  # only the last decoding (the finished answer's) is the whole answer


@pytest.mark.parametrize("text, stops, expected", [
    ("abc  ", (), "abc"), ("abc EN", ("END",), "abc"), ("abc ENx", ("END",), "abc ENx"), ("abc\n", ("\nUser:",), "abc"),
    ("abc\nUs", ("\nUser:", "s"), "abc"), ("ab", ("abc",), ""), ("ab\ufffdcd", (), "ab\ufffdcd"),
])
def test_settled_holds_back_only_what_a_later_token_may_change(text, stops, expected):
    assert settled(text, stops) == expected


def test_a_batch_routes_rows_to_their_jobs_drops_a_failing_callback_and_answers_a_job_once_its_rows_end():
    heard = []

    def failing(row, completion):
        raise RuntimeError("client gone")

    sampling = Sampling(temperature=1.0, top_p=1.0, n=2, max_tokens=4, stop=(), seed=0)
    jobs = [Job([[1], [2]], [4, 4], sampling, on_token=lambda row, c: heard.append(("a", row, c.tokens[-1]))),
            Job([[3]], [4], sampling, on_token=failing), Job([[4]], [4], sampling),
            Job([[5]], [4], sampling, on_token=lambda row, c: heard.append(("d", row, c.tokens[-1])))]
    batch = RunningBatch(SimpleNamespace(generated=0), jobs)
    for index in range(9):  # rows: a 0-3, b 4-5, c 6-7 (not streamed), d 8-9
        batch.on_token(index, Completion([100 + index]))
    batch.on_token(9, Completion([109]))
    assert heard == [("a", 0, 100), ("a", 1, 101), ("a", 2, 102), ("a", 3, 103), ("d", 0, 108), ("d", 1, 109)]
    assert jobs[1].on_token is None  # dropped after its first failure; the batch went on
    ends = [Completion([7, 2], "eos"), Completion([8], "length")]
    batch.on_token(7, ends[1])
    assert not jobs[2].future.done()
    batch.on_token(6, ends[0])
    assert jobs[2].future.result() == [ends] and not any(job.future.done() for job in jobs[:2] + jobs[3:])
    assert jobs[2] not in batch.indices and 6 not in batch.rows  # an answered job leaves the batch's books
    assert batch.batcher.generated == 12


def test_waiting_jobs_join_in_arrival_order_until_one_cannot():
    """A running batch lets waiting jobs join in the order they came while their rows fit
    its room, whatever their stop strings; the first that cannot join waits for the
    batch's end, and so do the jobs behind it (no job is overtaken for ever)."""
    sampling = Sampling(temperature=0, top_p=1.0, n=1, max_tokens=4, stop=(), seed=0)
    small, long, other = ([[1] * 3], [4], sampling), ([[1] * 30], [4], sampling), ([[2]], [4], Sampling(
        temperature=0, top_p=1.0, n=1, max_tokens=4, stop=("zz",), seed=0))
    for arrivals, joined in (([small, small], 2), ([small, long, small], 1), ([other, small], 2),
                             ([small, other, long, small], 2)):
        jobs = [Job(*job) for job in arrivals]
        batcher = SimpleNamespace(waiting=list(jobs), join_running=True)
        batch = RunningBatch(batcher, [])
        assert batch.joining(Room(columns=20, longest=5, largest_budget=8)) == jobs[:joined]
        assert batcher.waiting == jobs[joined:] and len(batch.rows) == joined
    dead, alive = Job(*long), Job(*small)
    dead.future.cancel()  # its client left while it waited: it blocks nothing
    batcher = SimpleNamespace(waiting=[dead, alive], join_running=True)
    assert RunningBatch(batcher, []).joining(Room(columns=20, longest=5, largest_budget=8)) == [alive]
    assert batcher.waiting == []


def streamed(tokenizer: Tokenizer, first_token: Completion, then: list, prompt_tokens: int | None) -> list:
    """A one-choice completions answer's events (JSON, or [DONE]) when the engine reports
    `first_token`, and once the stream began, the events `then`."""
    async def read() -> list[bytes]:
        events = TokenEvents(asyncio.get_running_loop())
        events(0, first_token)
        first = await events.next()
        for event in then:
            events.job_done(event) if isinstance(event, Future) else events(0, event)
        deltas = [TextDeltas(lambda c: completion_text(c, tokenizer.decode, ()), (), tokenizer.decode)]
        answer = StreamedAnswer(answer_head("m", "text_completion"), deltas, chat=False, prompt_tokens=prompt_tokens)
        told = [chunk async for chunk in answer.body(events, first)]
        assert events.gone.is_set()
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


def test_an_error_event_ends_a_stream_whose_batch_failed(tokenizer, caplog):
    """The event names an error id, not the exception (its text may tell about the server);
    the log has the exception under that id."""
    failed = Future()
    failed.set_exception(RuntimeError("CUDA error: an illegal memory access"))
    told = streamed(tokenizer, Completion(tokenizer.encode("good")[:1]), [failed], prompt_tokens=3)
    assert told[0]["choices"][0]["text"] == "g"
    error = told[1]["error"]
    assert (error["type"], error["param"], error["code"]) == ("server_error", None, None)
    assert "CUDA" not in error["message"] and "error id" in error["message"]
    [record] = [r for r in caplog.records if error["message"].split("error id ")[1][:12] in r.getMessage()]
    assert str(record.exc_info[1]) == "CUDA error: an illegal memory access"
    assert told[2:] == ["[DONE]"]  # and no usage chunk
