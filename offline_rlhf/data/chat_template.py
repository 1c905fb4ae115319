"""Conversations rendered with a tokenizer's own chat template (`chat_template` in its
tokenizer_config.json, Jinja), as `transformers`' `apply_chat_template` renders them, and
the character spans of the assistant turns: what a loss trains on.

A span is found by rendering the conversation up to an assistant turn twice: once ending
in the generation prompt (what inference feeds the model) and once with the turn itself.
The difference is exactly what the model must produce after that prompt, its end-of-turn
marker included, so the training text and the inference prompt agree by construction.
Templates whose renderings are not prefixes of one another (some rewrite earlier turns,
e.g. by dropping past reasoning) are rejected with the turn that breaks it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.data.template import (
    ASSISTANT,
    REWARD_TAG,
    SYSTEM,
    USER,
    ChatTemplate,
    Turn,
    fold_system,
    reward_text,
    split_system,
)

Message = dict  # {"role": SYSTEM | USER | ASSISTANT, "content": str}
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
TEMPLATE_DATE = datetime(2024, 7, 26)  # what strftime_now gives: Llama 3's templates' own default date_string


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (templates written for transformers'
    assistant masks) renders its body; the spans come from prefix rendering instead."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message: str):
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    # Chat templates ship with checkpoints, so they are untrusted code: sandboxed. Whitespace
    # control and globals as transformers sets them, or renderings would differ.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    # A fixed day, not today's: text rendered for training, its resume and inference would
    # otherwise differ from day to day (Llama 3.x templates print "Today Date").
    env.globals["strftime_now"] = lambda fmt: TEMPLATE_DATE.strftime(fmt)
    return env.from_string(source)


def _token_text(value) -> str | None:
    """tokenizer_config.json stores a special token as a string or a serialized AddedToken."""
    return value.get("content") if isinstance(value, dict) else value


@dataclass(frozen=True)
class ChatRendering:
    """A rendered conversation: its text and the [start, end) character spans of the
    assistant turns that are trained on."""

    text: str
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class JinjaChat:
    """A tokenizer's chat template with the special-token strings it may reference and the
    extra variables every rendering passes it (template.kwargs: `enable_thinking`...)."""

    source: str
    special_tokens: tuple[tuple[str, str], ...] = ()
    kwargs: tuple[tuple[str, object], ...] = ()

    @classmethod
    def of(cls, tokenizer_config: dict, kwargs: dict | None = None,
           where: str = "tokenizer_config.json") -> "JinjaChat":
        source = tokenizer_config.get("chat_template")
        if isinstance(source, list):  # several named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str) or not source.strip():
            raise ConfigError("template.kind", f"chat needs a chat_template in {where}, which has none",
                              "use template.kind=paper, or a tokenizer that ships a chat template")
        specials = tuple((name, text) for name in SPECIAL_TOKENS
                         if (text := _token_text(tokenizer_config.get(name))) is not None)
        return cls(source, specials, tuple((kwargs or {}).items()))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        try:
            return _compile(self.source).render(messages=[dict(m) for m in messages],
                                                add_generation_prompt=add_generation_prompt,
                                                **dict(self.special_tokens), **dict(self.kwargs))
        except jinja2.TemplateError as err:
            raise ValueError(f"the chat template failed: {err}") from None

    def prompt(self, messages: Sequence[Message], response_prefix: str = "") -> str:
        """What the model is fed to answer the last user turn: the conversation, the
        generation prompt, then `response_prefix` (a DT reward prompt) if any."""
        check_roles(messages, last=USER)
        return self.render(messages, add_generation_prompt=True) + response_prefix

    def conversation(self, messages: Sequence[Message], response_prefix: str = "",
                     every_turn: bool = True) -> ChatRendering:
        """The whole conversation (ending with an assistant turn) and the spans of every
        assistant turn, or with `every_turn=False` of the last one only: a template may
        render a turn differently once a later user turn follows (Qwen3's drops the empty
        reasoning block of every answer before the last question), which only the spans of
        earlier turns depend on. `response_prefix` goes right after the LAST turn's
        generation prompt, outside its span, as `prompt` places it at inference. The last
        answer may be empty (a labeller's preferred empty reply, an empty generation): its
        span is then the end-of-turn marker alone, as the paper's format labels EOS alone."""
        check_roles(messages, last=ASSISTANT)
        answers = [index for index, message in enumerate(messages) if message["role"] == ASSISTANT]
        text, spans = "", []
        for index in answers if every_turn else answers[-1:]:
            prompt = self.render(messages[:index], add_generation_prompt=True)
            turn = self.render(messages[:index + 1])
            _require_prefix(text, prompt, index, "generation prompt")
            _require_prefix(prompt, turn, index, "turn")
            text = turn
            spans.append((len(prompt), len(turn)))
        start, end = spans[-1]
        spans[-1] = (start + len(response_prefix), end + len(response_prefix))
        return ChatRendering(text[:start] + response_prefix + text[start:], tuple(spans))


def _require_prefix(prefix: str, text: str, index: int, what: str) -> None:
    if not text.startswith(prefix):
        raise ValueError(f"the chat template renders message {index + 1}'s {what} so that earlier text changes; "
                         "its assistant turns cannot be located (use template.kind=paper)")


def check_roles(messages: Sequence[Message], last: str) -> None:
    """An optional system message first, then user and assistant turns alternating from a
    user turn, all with text (but a last assistant turn, an answer, which may be empty),
    ending with a `last` turn."""
    turns = list(messages)
    if turns and turns[0].get("role") == SYSTEM:
        turns = turns[1:]
    if not turns:
        raise ValueError("expected at least one user turn")
    for index, message in enumerate(turns):
        expected = USER if index % 2 == 0 else ASSISTANT
        if message.get("role") != expected:
            raise ValueError(f"expected a {expected!r} turn at position {index + 1}, got {message.get('role')!r} "
                             "(after an optional system message, turns alternate user/assistant)")
        content = message.get("content")
        answer = expected == ASSISTANT and index == len(turns) - 1
        if not isinstance(content, str) or not (content.strip() or answer):
            raise ValueError(f"expected text in the {expected} turn at position {index + 1}")
    if turns[-1]["role"] != last:
        raise ValueError(f"expected the conversation to end with a {last!r} turn")


@dataclass(frozen=True)
class ChatFormat:
    """`template.kind=chat`: conversations through the tokenizer's chat template, used
    wherever the paper's `ChatTemplate` is (`encode_sft`, `encode_prompt` and the readers).
    Where one string must stand for a multi-turn history (a record's `prompt`), it is folded
    the paper's way; prompts and records also keep their turns (`turns`), rendered as
    messages."""

    chat: JinjaChat
    system: str = ""  # template.system
    folding: ChatTemplate = ChatTemplate()
    # False for a template that refuses a system message or moves it as a conversation goes
    # on: a conversation's own system text then opens its first user turn (`fold_system`).
    system_turns: bool = True

    def fold_history(self, turns: Sequence[Turn]) -> str:
        return self.folding.fold_history(turns)

    def with_variables(self, kwargs: dict) -> "ChatFormat":
        """This format with template variables `kwargs` over its own (template.kwargs)."""
        return replace(self, chat=replace(self.chat, kwargs=tuple({**dict(self.chat.kwargs), **kwargs}.items())))

    def messages(self, prompt: str, turns: Sequence[Turn] = ()) -> list[Message]:
        """The conversation before the answer: a system message (the conversation's own, else
        `system`), then the user and assistant turns of `turns` (or the prompt as one user turn)."""
        turns = turns or [(USER, prompt)]
        system, turns = split_system(turns if self.system_turns else fold_system(turns))
        system = system or self.system
        head = [{"role": SYSTEM, "content": system}] if system else []
        return head + [{"role": role, "content": text} for role, text in turns]

    def end_of_turn(self) -> str:
        """What the template writes right after an answer (ChatML's `<|im_end|>\n`, Llama 3's
        `<|eot_id|>`; empty for a template that writes nothing there)."""
        answer = "Fine."
        rendering = self.chat.conversation([*self.messages("Hi."), {"role": ASSISTANT, "content": answer}])
        start, end = rendering.spans[-1]
        turn = rendering.text[start:end]
        return turn[turn.rindex(answer) + len(answer):]

    def reward_prompt(self, score: float) -> str:
        """DT's reward prompt (paper Eq. 6) right after the generation prompt; the newline
        ends it on a pre-tokenization boundary, so training and inference tokenize alike."""
        return f"{REWARD_TAG} {reward_text(score)}\n"


def build_template(cfg, tokenizer_config: dict) -> ChatTemplate | ChatFormat:
    """The template a `TemplateConfig` (or its recorded dict) names, for this tokenizer."""
    fields = cfg if isinstance(cfg, dict) else asdict(cfg)
    if fields.get("kind", "paper") == "chat":
        chat = ChatFormat(JinjaChat.of(tokenizer_config, fields.get("kwargs")), fields.get("system", ""))
        refusal = _system_refusal(chat)
        if refusal and chat.system:
            raise ConfigError("template.system", f"is set, but the tokenizer's chat template refuses it or does not "
                              f"keep it where a conversation goes on ({refusal})",
                              "leave template.system empty for this model")
        return replace(chat, system_turns=refusal is None)
    return paper_template(fields)


def _system_refusal(chat: ChatFormat) -> str | None:
    """Why the template cannot take a system message, or None: some raise an exception, some
    move it as the conversation grows (Mistral NeMo's writes it into the last user turn, so a
    prompt has it and the conversation answering that prompt does not). Found before any
    data is read: template.system is then refused naming the setting, and records' own
    system turns are folded into their first user turn instead of failing one by one."""
    exchange = [(USER, "Hi."), (ASSISTANT, "Hello."), (USER, "Bye?")]

    def probe(fmt: ChatFormat) -> str | None:
        try:
            fmt.chat.prompt(fmt.messages("Hi."))
            fmt.chat.conversation([*fmt.messages("", exchange), {"role": ASSISTANT, "content": "Bye."}],
                                  every_turn=False)
        except ValueError as err:
            return str(err)
        return None

    # A template failing without a system message too is not the system message's fault:
    # encoding the data will say what it is.
    return None if probe(replace(chat, system="")) else probe(replace(chat, system=chat.system or "Be brief."))


def paper_template(cfg) -> ChatTemplate:
    """The paper's format with the tags of a `TemplateConfig` (or its dict), whatever its kind."""
    fields = cfg if isinstance(cfg, dict) else asdict(cfg)
    return ChatTemplate(**{key: fields[key] for key in ("user_tag", "assistant_tag", "sep") if key in fields})


def template_record(template: ChatTemplate | ChatFormat) -> dict:
    """What a checkpoint records (metadata["template"]) so every later stage renders as
    training did; a chat template's Jinja source travels in the checkpoint's tokenizer. Its
    variables (template.kwargs) only when set: a record without them (older checkpoints
    too) has none, and the records of templates without any stay as they were."""
    if isinstance(template, ChatFormat):
        variables = {"kwargs": dict(template.chat.kwargs)} if template.chat.kwargs else {}
        return {"kind": "chat", "system": template.system, **variables}
    return {"kind": "paper", **asdict(template)}


def paper_jinja(template: ChatTemplate, bos: bool) -> str:
    """A chat template (Jinja) rendering the paper's format exactly as `encode_prompt` and
    `encode_sft` do: `User: u1 Assistant: a1 User: u2 Assistant:`, EOS after a final answer,
    BOS first when the tokenizer adds one, the leading system messages' text before u1
    (`_LEADING_SYSTEM`). `orlhf convert export_hf` writes it into the exported tokenizer,
    so `apply_chat_template` prompts the model the way it was trained and served."""
    sep, user, assistant = (jinja_string(text) for text in (template.sep, template.user_tag, template.assistant_tag))
    return ("{%- if " + ("true" if bos else "false") + " %}{{- bos_token }}{%- endif %}" + _LEADING_SYSTEM +
            "{%- for m in messages %}"
            "{%- if m['role'] == 'user' %}{{- ('' if loop.first else " + sep + ") + " + user + " + " + sep
            + " + (orlhf_system if loop.first else '') + m['content'] | trim }}"
            "{%- elif m['role'] == 'assistant' %}{{- " + sep + " + " + assistant + " + " + sep
            + " + m['content'] | trim }}{%- if loop.last %}{{- eos_token }}{%- endif %}"
            "{%- else %}{{- raise_exception('the paper format has user and assistant turns only') }}{%- endif %}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- " + sep + " + " + assistant + " }}{%- endif %}")


# Jinja setting `orlhf_system` to the texts of the conversation's leading system (or
# developer) messages, each followed by a blank line (blank ones left out), and `messages`
# to the rest: a request's as `orlhf serve` reads them (`chat_turns`) for `fold_system`.
# Top-level `set`s (Jinja's `if` opens no scope; `messages` shadows the caller's).
_LEADING_SYSTEM = (
    "{%- set orlhf_ns = namespace(system='', start=0) %}"
    "{%- for m in messages %}{%- if loop.index0 == orlhf_ns.start and m['role'] in ['system', 'developer'] %}"
    "{%- if m['content'] | trim %}{%- set orlhf_ns.system = orlhf_ns.system + m['content'] | trim + '\\n\\n' %}"
    "{%- endif %}"
    "{%- set orlhf_ns.start = loop.index %}{%- endif %}{%- endfor %}"
    "{%- set orlhf_system = orlhf_ns.system %}{%- set messages = messages[orlhf_ns.start:] %}")


def with_folded_system(source: str) -> str:
    """A chat template that renders as `source` does, the leading system messages' text
    moved into the first message (a user turn) a blank line apart (`fold_system`): what
    training and `orlhf serve` give a template that refuses a system message or moves it."""
    return (_LEADING_SYSTEM + "{%- if orlhf_system and messages %}{%- set messages = [{'role': messages[0]['role'], "
            "'content': orlhf_system + messages[0]['content'] | trim}] + messages[1:] %}{%- endif %}" + source)


def with_default_system(source: str, system: str) -> str:
    """A chat template that renders as `source` does after a system message `system` first
    when the conversation has none (what training with template.system did); a caller's
    own system message replaces it. Exports carry it, so Hugging Face users prompt the
    model as it was trained. (A top-level `set` shadows the caller's `messages`.)"""
    return ("{%- if not messages or messages[0]['role'] != 'system' %}"
            "{%- set messages = [{'role': 'system', 'content': " + jinja_string(system) + "}] + messages %}"
            "{%- endif %}" + source)


def with_default_variables(source: str, kwargs: dict) -> str:
    """A chat template that renders as `source` does with the variables `kwargs` (what training
    passed, template.kwargs) set to their values where the caller passes none of its own:
    `apply_chat_template(messages)` prompts the model as it was trained, and a caller's
    `enable_thinking=True` still wins. (Jinja's `if` opens no scope: the `set` is top-level.)"""
    return "".join("{%- if " + name + " is not defined %}{%- set " + name + " = " + jinja_literal(value)
                   + " %}{%- endif %}" for name, value in kwargs.items()) + source


def with_reward_prompt(source: str, reward_prompt: str) -> str:
    """A chat template that renders as `source` does, with `reward_prompt` (DT's, Eq. 6)
    right after the generation prompt, where `encode_prompt` puts it."""
    return source + "{%- if add_generation_prompt %}{{- " + jinja_string(reward_prompt) + " }}{%- endif %}"


def jinja_literal(value) -> str:
    """A JSON value as a Jinja literal: as JSON writes it but `none` for null, which Jinja
    would read as an undefined variable (strings as `jinja_string` writes them)."""
    if isinstance(value, dict):
        return "{" + ", ".join(jinja_string(name) + ": " + jinja_literal(item) for name, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(jinja_literal(item) for item in value) + "]"
    if isinstance(value, str):
        return jinja_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return repr(value)


def jinja_string(text: str) -> str:
    """`text` as a Jinja string literal. JSON's escapes are Jinja's, but not ASCII-only
    JSON: Jinja decodes a character past U+FFFF written as two surrogate escapes into two
    broken characters."""
    return json.dumps(text, ensure_ascii=False)
