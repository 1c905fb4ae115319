"""Prompt/response pairs to token ids and loss labels (no torch here).

Labels are aligned with `input_ids`: `labels[t]` is `input_ids[t]` where the token
is trained on and `IGNORE_INDEX` where it is not. The shift for next-token
prediction (logits at t score labels[t + 1]) happens in the loss, not here.

Token fields are `TokenIds`, read like the tuples of ints they replace: 4 bytes a token
where a tuple took an 8-byte slot plus a 28-byte int for each id above 256 (every rank
holds the whole tokenized dataset).
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from offline_rlhf.data.chat_template import ChatFormat, JinjaChat, Message
from offline_rlhf.data.errors import DataError
from offline_rlhf.data.template import ASSISTANT, ChatTemplate, Turn, split_system

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


class TokenIds(array):
    """Token ids (or labels, positions) as C ints, read-only, behaving as the tuple of
    ints they replace: equal to a tuple or array of the same values (never to a list, as
    a tuple is not), hashed and repr'd as that tuple (so digests of either are the
    same), sliced and concatenated (with a tuple too) into TokenIds. The buffer is the
    ints themselves, for `torch.frombuffer`. Changing one in place is a TypeError: a
    sample's fields are shared (a one-document PackedSequence holds its sample's)."""

    __slots__ = ()

    def __new__(cls, values: Iterable[int] = ()) -> TokenIds:
        return super().__new__(cls, "i", values)

    def __getitem__(self, index):
        item = array.__getitem__(self, index)
        return TokenIds(item) if isinstance(index, slice) else item

    def __add__(self, other: Iterable[int]) -> TokenIds:
        joined = TokenIds(self)
        array.extend(joined, other if isinstance(other, TokenIds) else TokenIds(other))
        return joined

    def __radd__(self, other: Iterable[int]) -> TokenIds:
        return TokenIds(other) + self

    def __mul__(self, times: int) -> TokenIds:
        return TokenIds(array.__mul__(self, times))

    __rmul__ = __mul__
    __iadd__ = __add__  # `ids += more` rebinds to a new one, as with a tuple
    __imul__ = __mul__

    def __eq__(self, other) -> bool:
        if isinstance(other, array):
            return array.__eq__(self, other)
        if isinstance(other, tuple):
            return len(self) == len(other) and all(map(operator.eq, self, other))
        return NotImplemented

    def __ne__(self, other) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))

    def __copy__(self) -> TokenIds:
        return self

    def __deepcopy__(self, memo) -> TokenIds:
        return self

    def __reduce_ex__(self, protocol):  # array's own would call TokenIds("i", ...) for protocols below 3
        return TokenIds, (self.tolist(),)


def _read_only(name: str):
    def refuse(self, *args, **kwargs):
        raise TypeError(f"TokenIds are read-only, as the tuples they replace: no {name}")
    return refuse


for _name in ("append", "byteswap", "extend", "frombytes", "fromfile", "fromlist", "fromunicode", "insert", "pop",
              "remove", "reverse", "__setitem__", "__delitem__"):
    setattr(TokenIds, _name, _read_only(_name))
del _name


@dataclass(frozen=True, slots=True)
class TokenizedSample:
    """One document: `input_ids` and `labels` of equal length, `source` for tracing,
    `truncated` when any token was cut to fit the length limit. Token fields given as
    any sequence of ints (a tuple) are stored as `TokenIds`."""

    input_ids: TokenIds
    labels: TokenIds
    source: str
    truncated: bool

    def __post_init__(self):
        for name in ("input_ids", "labels"):
            if not isinstance(getattr(self, name), TokenIds):
                object.__setattr__(self, name, TokenIds(getattr(self, name)))
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{self.source}: {len(self.input_ids)} input ids but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def response_tokens(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def truncate_pair(prompt_ids: Sequence[int], response_ids: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut a prompt/response pair to at most `max_len` tokens, deterministically.

    Rule, applied only when `len(prompt) + len(response) > max_len`:
    1. drop tokens from the START of the prompt (the oldest history), keeping at
       least `min(len(prompt), max_len // 2)` prompt tokens;
    2. if still too long, cut the response from its END (its EOS is then lost).
    With max_len >= 2 and both sides non-empty (encode_sft's response always ends in
    EOS), at least one prompt token and at least one response token survive.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if len(prompt_ids) + len(response_ids) <= max_len:
        return list(prompt_ids), list(response_ids)
    prompt_floor = min(len(prompt_ids), max_len // 2)
    prompt_keep = max(max_len - len(response_ids), prompt_floor)
    kept_prompt = list(prompt_ids[len(prompt_ids) - prompt_keep:])
    return kept_prompt, list(response_ids[: max_len - len(kept_prompt)])


def encode_prompt(tokenizer, template: ChatTemplate | ChatFormat, prompt: str, response_prefix: str = "",
                  turns: Sequence[Turn] = ()) -> list[int]:
    """The prompt side of a sample, exactly as training sees it; generation encodes its
    prompts with this same function, so a model is prompted the way it was trained. BOS
    leads when the tokenizer asks for it (a chat template writes its own). The turns of a
    multi-turn prompt are what is rendered, by either template: the paper's folds them with
    its own tags (`prompt`, folded elsewhere, may carry another template's)."""
    if isinstance(template, ChatFormat):
        return tokenizer.encode(template.chat.prompt(template.messages(prompt, turns), response_prefix))
    instruction = template.fold_history(turns) if turns else prompt
    return tokenizer.encode(template.prompt_text(instruction) + response_prefix, add_bos=tokenizer.adds_bos)


def fit_prompt(tokenizer, template: ChatTemplate | ChatFormat, prompt: str, budget: int, response_prefix: str = "",
               turns: Sequence[Turn] = ()) -> tuple[list[int], bool]:
    """`encode_prompt` within `budget` tokens, and whether anything was cut: a conversation
    loses whole exchanges first, oldest first (the template's or the conversation's system
    message and the last user turn stay, so the model still sees a conversation rendered as
    in training); a prompt still too long keeps its last `budget` tokens."""
    ids, dropped = fit_turns(turns, lambda kept: encode_prompt(tokenizer, template, prompt, response_prefix, kept),
                             lambda ids: len(ids) <= budget)
    return ids[-budget:], dropped > 0 or len(ids) > budget


Encoded = TypeVar("Encoded")
SEQUENTIAL_DROPS = 4  # exchanges `fit_turns` drops one at a time before it bisects


def fit_turns(turns: Sequence[Turn], encode: Callable[[Sequence[Turn]], Encoded],
              fits: Callable[[Encoded], bool]) -> tuple[Encoded, int]:
    """`encode` of the turns without as few of their oldest exchanges (user, assistant) as
    make it `fits` (the last user turn and a leading system turn always stay), and the
    number of turns dropped.

    Exchanges go one at a time, oldest first, for the first `SEQUENTIAL_DROPS`; a
    conversation that needs more is bisected (`_bisect_turns`) instead of re-encoded after
    every exchange, which cost time quadratic in its length (a 3,000-turn one, 29 s)."""
    system, conversation = split_system(turns)
    if system:
        return fit_turns(conversation, lambda kept: encode([turns[0], *kept]), fits)
    dropped, encoded = 0, encode(turns)
    while dropped + 2 < len(turns) and not fits(encoded):
        if dropped == 2 * SEQUENTIAL_DROPS:
            return _bisect_turns(turns, encode, fits, dropped)
        dropped += 2
        encoded = encode(turns[dropped:])
    return encoded, dropped


def _bisect_turns(turns: Sequence[Turn], encode: Callable[[Sequence[Turn]], Encoded],
                  fits: Callable[[Encoded], bool], unfit: int) -> tuple[Encoded, int]:
    """`fit_turns` past `unfit` turns dropped (which did not fit): the fewest exchanges
    dropped that fit, found by bisection, else all but the last user turn. The answer of
    dropping one exchange at a time wherever dropping an exchange never lengthens the
    encoding: whole turns and their tags go, and a tokenizer that splits text into words
    before merging (byte-level BPE: ours, Llama 3's, Qwen's) tokenizes the rest as before
    (tests/unit/data/test_tokenize_equivalence.py checks it on real conversations)."""
    last = len(turns) - 1 - (len(turns) - 1 - unfit) % 2  # the most that can go: all but the last user turn
    fitting, fitting_encoded = last, None
    while fitting - unfit > 2:
        middle = unfit + (fitting - unfit) // 4 * 2
        encoded = encode(turns[middle:])
        if fits(encoded):
            fitting, fitting_encoded = middle, encoded
        else:
            unfit = middle
    return (encode(turns[fitting:]) if fitting_encoded is None else fitting_encoded), fitting


def stop_token_ids(tokenizer, template: ChatTemplate | ChatFormat) -> set[int]:
    """The tokens that end an answer: EOS and the other ids the model's generation_config.json
    lists (`Tokenizer.generation_eos_ids`: transformers stops at each, Llama 3.1 Instruct at
    `<|eom_id|>` too), and with a chat template its end-of-turn marker when that begins with
    a special token of its own (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`): a model
    fine-tuned from a base tokenizer, whose EOS is another token, learns to end its answers
    with the marker."""
    stops = {tokenizer.eos_id, *tokenizer.generation_eos_ids} - {None}
    if isinstance(template, ChatFormat) and (marker := template.end_of_turn().strip()):
        first = tokenizer.backend.encode(marker, add_special_tokens=False).ids[0]
        added = tokenizer.backend.get_added_tokens_decoder().get(first)
        if added is not None and added.special:
            stops.add(first)
    return stops


def encode_sft(
    tokenizer,
    template: ChatTemplate | ChatFormat,
    prompt: str,
    response: str,
    max_len: int,
    source: str,
    response_prefix: str = "",
    eos: bool = True,
    turns: Sequence[Turn] = (),
) -> TokenizedSample:
    """Tokenize `template.prompt_text(prompt) + response_prefix` and
    `template.response_text(response) + EOS` separately and concatenate them.

    `eos=False` for a response that did not end (a generation cut at max_new_tokens,
    `finished: false`): an EOS there would train the model to stop early, and a reward
    read at it would score the cut answer as complete.

    Separate encoding makes the loss boundary exact (no BPE merge across it). The
    prompt side, `response_prefix` included (Decision Transformer's ` <rm_score> 4.5`),
    gets IGNORE_INDEX labels; response tokens and the EOS are labelled with their ids.
    With a chat template the whole conversation (`turns`, or the prompt as one user turn)
    is rendered by it as one text (`_label_chat`), labelled on the answer and its end-of-turn marker.
    An over-long conversation loses its oldest exchanges while that keeps the prompt from
    being cut (`fit_turns`); what is still too long is cut by `truncate_pair`.
    """
    return encode_replies(tokenizer, template, prompt, [Reply(response, eos, source)], max_len, response_prefix,
                          turns)[0]


@dataclass(frozen=True)
class Reply:
    """One reply of `encode_replies`: its text, whether it ended (EOS), the sample's source."""

    text: str
    eos: bool
    source: str


def encode_replies(tokenizer, template: ChatTemplate | ChatFormat, prompt: str, replies: Sequence[Reply],
                   max_len: int, response_prefix: str = "", turns: Sequence[Turn] = ()) -> list[TokenizedSample]:
    """`encode_sft` of several replies to one prompt (the two sides of a preference pair):
    an over-long conversation loses the exchanges the longest reply needs, on every side,
    so that each side answers the same history.

    The paper's template encodes the prompt apart from the replies, so it is encoded once
    per kept history and shared by every reply; what fits is decided on its length alone
    (`_prompt_room`), the labelled samples built once, for the history kept. A chat
    template renders prompt and answer as one text: each reply is encoded whole."""
    if not replies:
        return []
    if isinstance(template, ChatFormat):
        labellers = [_chat_labeller(tokenizer, template, prompt, reply, response_prefix) for reply in replies]
        try:
            samples, dropped = fit_turns(turns, lambda kept: [label(kept) for label in labellers],
                                         lambda samples: all(sample.prompt_whole(max_len) for sample in samples))
        except ValueError as err:  # the template refused the conversation: name the record, not a traceback
            raise DataError(replies[0].source, None, f"the tokenizer's chat template cannot encode it: {err}") from None
    else:
        responses = [_response_ids(tokenizer, template, reply) for reply in replies]
        room = min(_prompt_room(len(response), max_len) for response in responses)
        prompt_ids, dropped = fit_turns(turns, lambda kept: encode_prompt(tokenizer, template, prompt,
                                                                          response_prefix, kept),
                                        lambda ids: len(ids) <= room)
        unlabelled = [IGNORE_INDEX] * len(prompt_ids)
        samples = [_Labelled(prompt_ids + response, unlabelled + response, len(prompt_ids)) for response in responses]
    return [sample.cut(max_len, reply.source, turns_dropped=dropped > 0) for sample, reply in zip(samples, replies)]


def _prompt_room(response_len: int, max_len: int) -> int:
    """The most prompt tokens `truncate_pair` keeps whole beside a response of
    `response_len` tokens (`_Labelled.prompt_whole`)."""
    return max(max_len - response_len, max_len // 2)


def _response_ids(tokenizer, template: ChatTemplate, reply: Reply) -> list[int]:
    """The paper template's response side of `reply`: its text, and EOS when it ended."""
    if reply.eos and tokenizer.eos_id is None:
        raise ValueError("the tokenizer defines no eos_token; SFT needs one to end responses")
    return tokenizer.encode(template.response_text(reply.text)) + ([tokenizer.eos_id] if reply.eos else [])


def _chat_labeller(tokenizer, template: ChatFormat, prompt: str, reply: Reply,
                   response_prefix: str) -> Callable[[Sequence[Turn]], _Labelled]:
    """The labelled sample of `reply` after the turns kept of a conversation, rendered by a
    chat template."""
    answer = {"role": ASSISTANT, "content": reply.text}
    return lambda kept: _label_chat(tokenizer, template.chat, [*template.messages(prompt, kept), answer],
                                    response_prefix, every_turn=False, end_of_turn=reply.eos)


@dataclass(frozen=True)
class _Labelled:
    """A sample's ids and labels before any cut, and where its response starts."""

    ids: list[int]
    labels: list[int]
    response_start: int

    def prompt_whole(self, max_len: int) -> bool:
        """Whether `cut` keeps every prompt token (see `truncate_pair`)."""
        return self.response_start <= _prompt_room(len(self.ids) - self.response_start, max_len)

    def cut(self, max_len: int, source: str, turns_dropped: bool = False) -> TokenizedSample:
        """The sample within `max_len` tokens (`truncate_pair`); truncated if anything was
        cut, earlier turns included."""
        start = self.response_start
        kept_prompt, kept_response = truncate_pair(self.ids[:start], self.ids[start:], max_len)
        dropped, kept = start - len(kept_prompt), len(kept_prompt) + len(kept_response)
        return TokenizedSample(input_ids=TokenIds(kept_prompt + kept_response),
                               labels=TokenIds(self.labels[dropped:dropped + kept]), source=source,
                               truncated=turns_dropped or kept < len(self.ids))


def _label_chat(tokenizer, chat: JinjaChat, messages: Sequence[Message], response_prefix: str, every_turn: bool,
                end_of_turn: bool) -> _Labelled:
    """A conversation ending in an assistant turn, rendered by the tokenizer's own chat
    template and tokenized as one text (as `apply_chat_template` does), labelled on the
    tokens of the assistant turns (each with its end-of-turn marker) and nowhere else:
    every turn, or with `every_turn=False` only the last (earlier ones are history; what
    training uses, every turn is what the tests compare with transformers' assistant mask).
    `response_prefix` (DT's reward prompt) sits after the last generation prompt, unlabelled;
    `end_of_turn=False` ends the text with the last answer (one cut at max_new_tokens).
    The response of `_Labelled.cut` (`truncate_pair`) is the last assistant turn."""
    rendering = chat.conversation(messages, response_prefix, every_turn)
    spans = rendering.spans
    text = rendering.text if end_of_turn else _through_answer(rendering.text, spans[-1][0], messages[-1]["content"])
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids, starts = list(encoding.ids), [begin for begin, _ in encoding.offsets]
    labels = [token if any(a <= begin < b for a, b in spans) else IGNORE_INDEX for token, begin in zip(ids, starts)]
    # The response's first token; none for an empty answer cut before its end-of-turn marker
    # (a scorer then reads the prompt alone; nothing is labelled).
    response_start = next((i for i, begin in enumerate(starts) if begin >= spans[-1][0]), len(ids))
    return _Labelled(ids, labels, response_start)


def _through_answer(text: str, start: int, answer: str) -> str:
    """`text` up to the end of `answer`, which the template placed at or after `start`."""
    at = text.find(answer.strip(), start)
    if at < 0:
        raise ValueError("the chat template rewrites the answer text; an unfinished answer cannot be cut from it")
    return text[:at + len(answer.strip())]


@dataclass
class TokenStats:
    """Running counts over tokenized samples, for the dataset card."""

    samples: int = 0
    tokens: int = 0
    response_tokens: int = 0
    truncated: int = 0

    def add(self, sample: TokenizedSample) -> None:
        self.samples += 1
        self.tokens += len(sample)
        self.response_tokens += sample.response_tokens
        self.truncated += sample.truncated
