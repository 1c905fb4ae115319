"""Request checks and answer shapes of the OpenAI protocol, without a server."""

from __future__ import annotations

import pytest

from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.serving.protocol import (
    APIError,
    Choice,
    Limits,
    Streaming,
    chat_answer,
    chat_turns,
    completion_answer,
    parse_body,
    parse_chat,
    parse_completion,
)

LIMITS = Limits(max_n=4, max_prompts=3)


def chat(**fields):
    return parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}, LIMITS)


def test_defaults_are_openais_and_temperature_zero_is_greedy():
    sampling = chat().sampling
    assert (sampling.temperature, sampling.top_p, sampling.n, sampling.max_tokens, sampling.stop) == \
        (1.0, 1.0, 1, None, ())
    assert not sampling.greedy and chat(temperature=0).sampling.greedy
    assert 0 <= sampling.seed < 2**32


def test_a_temperature_below_the_sampling_minimum_is_greedy():
    # 1e-46 is 0 in float32 (logits / 0 is NaN); 1e-6 is argmax decoding in all but name, as in vLLM.
    assert chat(temperature=1e-46).sampling.greedy and chat(temperature=1e-6).sampling.greedy
    assert not chat(temperature=1e-5).sampling.greedy


def test_seed_stop_and_token_budget_are_read():
    sampling = chat(seed=2**32 + 5, stop="END", max_completion_tokens=7, top_p=0.5, n=4).sampling
    assert (sampling.seed, sampling.stop, sampling.max_tokens, sampling.top_p, sampling.n) == (5, ("END",), 7, 0.5, 4)
    assert chat(stop=["a", "b", "a"]).sampling.stop == ("a", "b")
    with pytest.raises(APIError, match="not both"):
        chat(max_tokens=3, max_completion_tokens=4)


def test_nulls_mean_defaults_and_neutral_openai_fields_are_accepted():
    sampling = chat(temperature=None, n=None, stop=None, frequency_penalty=0.0, presence_penalty=0, logprobs=False,
                    stream=False, user="someone", store=False, metadata={}).sampling
    assert (sampling.temperature, sampling.n, sampling.stop) == (1.0, 1, ())
    assert chat(store=None, metadata=None).sampling.n == 1


def test_stream_and_its_usage_option_are_read():
    assert chat().streaming == Streaming(stream=False, include_usage=False)
    assert chat(stream=True).streaming == Streaming(stream=True, include_usage=False)
    assert chat(stream=True, stream_options={"include_usage": True}).streaming == Streaming(True, True)
    assert parse_completion({"model": "m", "prompt": "a", "stream": True, "stream_options": None},
                            LIMITS).streaming == Streaming(True, False)


@pytest.mark.parametrize("fields, param", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"), ({"n": 5}, "n"), ({"n": 2.0}, "n"), ({"max_tokens": -1}, "max_tokens"),
    ({"seed": "1"}, "seed"), ({"stop": 3}, "stop"), ({"stop": ["x" * 201]}, "stop"), ({"user": 1}, "user"),
    ({"logprobs": True}, "logprobs"), ({"frequency_penalty": False}, "frequency_penalty"), ({"tools": [{}]}, "tools"),
    ({"best_of": 2}, "best_of"), ({"functions": []}, "functions"), ({"model": 3}, "model"),
    ({"store": True}, "store"), ({"metadata": {"user": "x"}}, "metadata"),
    ({"stream": 1}, "stream"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": []}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
])
def test_bad_fields_are_errors_naming_them(fields, param):
    with pytest.raises(APIError) as error:
        chat(**fields)
    assert error.value.status == 400 and error.value.param == param


def test_a_refused_feature_is_named_before_its_value_which_is_cut_short():
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}} for i in range(9)]
    with pytest.raises(APIError) as error:
        chat(tools=tools)
    message = str(error.value)
    assert message.startswith("tools is not supported by this server (leave it out); got [{")
    assert message.endswith("...") and len(message) < 120 and error.value.code == "unsupported_parameter"
    with pytest.raises(APIError, match=r"\(leave it out\); got true$"):
        chat(store=True)


def test_a_participant_name_is_refused_not_dropped():
    with pytest.raises(APIError) as error:
        chat_turns([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "name": "bot"},
                    {"role": "user", "content": "c"}])
    assert (error.value.status, error.value.param) == (400, "messages[1].name")
    assert error.value.code == "unsupported_parameter"
    assert chat_turns([{"role": "user", "content": "a", "name": None}]) == [("user", "a")]


def test_system_texts_are_one_system_turn_which_the_papers_template_puts_before_the_first_user_turn():
    turns = chat_turns([{"role": "system", "content": " Be brief. "}, {"role": "developer", "content": "Be kind."},
                        {"role": "system", "content": " "},  # an empty one says nothing
                        {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                     {"type": "text", "text": "there"}]},
                        {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": "Bye"}])
    assert turns == [("system", "Be brief.\n\nBe kind."), ("user", "Hi there"), ("assistant", "Hello."),
                     ("user", "Bye")]
    assert chat_turns([{"role": "system", "content": ""}, {"role": "user", "content": "a"}]) == [("user", "a")]
    template = ChatTemplate()
    assert template.prompt_text(template.fold_history(turns)) == \
        "User: Be brief.\n\nBe kind.\n\nHi there Assistant: Hello. User: Bye Assistant:"


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only open"),
    ([{"role": "tool", "content": "a"}], "unsupported role"),
    ([{"role": "user", "content": {"text": "a"}}], "content must be"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "content must be"),
    (["user: hi"], "must be an object"),
    ([{"role": "user", "content": "a", "tool_calls": []}], "unknown field"),
])
def test_malformed_messages_are_errors(messages, match):
    with pytest.raises(APIError, match=match):
        chat_turns(messages)


def test_completion_prompts_are_text_and_bounded():
    assert parse_completion({"model": "m", "prompt": "a"}, LIMITS).prompts == ["a"]
    assert parse_completion({"model": "m", "prompt": ["a", "b"]}, LIMITS).prompts == ["a", "b"]
    for prompt in ([], [1, 2], ["a"] * 4, None):
        with pytest.raises(APIError):
            parse_completion({"model": "m", "prompt": prompt}, LIMITS)


DEEP = b'{"a": ' + b"[" * 10**5 + b"]" * 10**5 + b"}"
HUGE_INT = b'{"seed": ' + b"9" * 5000 + b"}"  # Python refuses to convert integers over 4300 digits (a ValueError)


@pytest.mark.parametrize("body", [b"{", b"[1]", b'"x"', b"\xff", b'{"a": Infinity}', DEEP, b'{"a": "\\ud800"}',
                                  HUGE_INT])
def test_a_body_must_be_a_json_object(body):
    with pytest.raises(APIError):
        parse_body(body)


def test_answers_have_openais_shape_and_usage():
    choices = [Choice("a", "stop", 3), Choice("b", "length", 5)]
    answer = chat_answer("m", choices, 10)
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert answer["usage"] == {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}
    assert answer["choices"][1] == {"index": 1, "message": {"role": "assistant", "content": "b"}, "logprobs": None,
                                    "finish_reason": "length"}
    text = completion_answer("m", choices, 4)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "a"


def test_chat_template_kwargs_are_checked_as_template_kwargs_are():
    limits = LIMITS
    body = {"model": "m", "messages": [{"role": "user", "content": "a"}]}
    assert parse_chat(body, limits).template_kwargs == {}
    assert parse_chat({**body, "chat_template_kwargs": None}, limits).template_kwargs == {}
    assert parse_chat({**body, "chat_template_kwargs": {"enable_thinking": True, "n": [1, {"a": None}]}},
                      limits).template_kwargs == {"enable_thinking": True, "n": [1, {"a": None}]}
    for kwargs, param in (([1], "chat_template_kwargs"), ({"eos_token": "x"}, "chat_template_kwargs.eos_token"),
                          ({"not a name": 1}, "chat_template_kwargs.not a name")):
        with pytest.raises(APIError) as error:
            parse_chat({**body, "chat_template_kwargs": kwargs}, limits)
        assert (error.value.status, error.value.param) == (400, param)
        assert str(error.value).startswith(param)
