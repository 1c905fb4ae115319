"""`template.kwargs`: extra variables for a tokenizer's chat template (Qwen3's
`enable_thinking`), checked when the config is built and settable from the command line,
key by key or as one mapping."""

import math

import pytest
from omegaconf import OmegaConf

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import TEMPLATE_VARIABLES, TemplateConfig
from offline_rlhf.config.training import SFTConfig
from offline_rlhf.data.chat_template import SPECIAL_TOKENS


def test_json_values_are_taken_as_plain_containers():
    kwargs = OmegaConf.create({"enable_thinking": False, "tools_hint": [1, 2.5, None, {"a": "b"}], "n": 3})
    cfg = TemplateConfig(kind="chat", kwargs=kwargs)
    assert cfg.kwargs == {"enable_thinking": False, "tools_hint": [1, 2.5, None, {"a": "b"}], "n": 3}
    assert type(cfg.kwargs) is dict and type(cfg.kwargs["tools_hint"]) is list
    assert type(cfg.kwargs["tools_hint"][3]) is dict
    assert TemplateConfig().kwargs == {}


@pytest.mark.parametrize("kwargs,message", [
    ({"messages": []}, "template.kwargs.messages: is set by the renderer itself"),
    ({"add_generation_prompt": True}, "template.kwargs.add_generation_prompt: is set by the renderer itself"),
    ({"eos_token": "x"}, "template.kwargs.eos_token: is set by the renderer itself"),
    ({"strftime_now": 1}, "template.kwargs.strftime_now: is set by the renderer itself"),
    ({"enable-thinking": False}, "template.kwargs.enable-thinking: is not a name a Jinja template can read"),
    ({"2x": 1}, "template.kwargs.2x: is not a name a Jinja template can read"),
    ({"none": 1}, "template.kwargs.none: is not a name a Jinja template can read"),
    ({"x": math.inf}, "template.kwargs.x: is not a JSON value: inf"),
    ({"x": [1, {"y": math.nan}]}, r"template.kwargs.x\[1\].y: is not a JSON value: nan"),
    ({"x": {1: "a"}}, "template.kwargs.x: has a key that is not a string"),
    ({"x": b"bytes"}, "template.kwargs.x: is not a JSON value: b'bytes'"),
    ({"x": {1, 2}}, r"template.kwargs.x: is not a JSON value: \{1, 2\}"),
])
def test_bad_variables_are_refused_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError, match="^" + message):
        TemplateConfig(kind="chat", kwargs=kwargs)


def test_kwargs_need_a_chat_template_and_a_mapping():
    with pytest.raises(ConfigError, match=r"^template.kwargs: needs template.kind=chat"):
        TemplateConfig(kwargs={"enable_thinking": False})
    with pytest.raises(ConfigError, match=r"^template.kwargs: must be a mapping .*e.g. "
                                          r"\{enable_thinking: false\}"):
        TemplateConfig(kind="chat", kwargs=[1])


def test_every_name_the_renderer_passes_is_reserved():
    assert set(SPECIAL_TOKENS) <= set(TEMPLATE_VARIABLES)


def compose_sft(*overrides):
    return compose_stage("sft", SFTConfig, ["run_dir=/tmp/unused", "data.template.kind=chat", *overrides])


def test_the_command_line_sets_a_variable_or_all_of_them():
    """A dict field's keys are the user's: struct mode used to refuse every new one ("Key
    'enable_thinking' is not in struct"), and `+key=` is refused for schema keys."""
    assert compose_sft("data.template.kwargs.enable_thinking=false").data.template.kwargs == {"enable_thinking": False}
    both = compose_sft("data.template.kwargs={enable_thinking: false, depth: [1, {a: null}]}")
    assert both.data.template.kwargs == {"enable_thinking": False, "depth": [1, {"a": None}]}
    assert compose_sft().data.template.kwargs == {}


def test_a_bad_variable_on_the_command_line_is_one_line_naming_it():
    with pytest.raises(ConfigError, match=r"^template.kwargs.messages: is set by the renderer itself"):
        compose_sft("data.template.kwargs.messages=1")
    with pytest.raises(ConfigError, match=r"^template.kwargs: needs template.kind=chat"):
        compose_stage("sft", SFTConfig, ["run_dir=/tmp/unused", "data.template.kwargs.enable_thinking=false"])
    with pytest.raises(ConfigError, match=r"^data.template.kwargss: unknown key .*did you mean data.template.kwargs"):
        compose_sft("data.template.kwargss.enable_thinking=false")


def test_an_unparsable_variable_is_named_as_the_user_wrote_it():
    """The `++` the dict field's override is given for Hydra is not the user's."""
    with pytest.raises(ConfigError) as error:
        compose_sft("data.template.kwargs.a=[1,2")
    assert str(error.value).startswith("data.template.kwargs.a: cannot parse 'data.template.kwargs.a=[1,2'")
    assert "++" not in str(error.value)
