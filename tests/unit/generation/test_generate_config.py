"""`orlhf generate` settings that would fail late (after the model loads, or as a raw
traceback from the mix) or waste compute silently are refused when the config is read."""

import pytest

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.samples import GenerateConfig


@pytest.mark.parametrize("overrides,key,fragment", [
    (["total_prompts=0"], "total_prompts", "must be >= 1 or null, got 0"),
    (["total_prompts=-5"], "total_prompts", "must be >= 1 or null, got -5"),
    (["max_prompt_tokens=0"], "max_prompt_tokens", "must be positive, got 0"),
    (["write_every=-3"], "write_every", "must be positive, got -3"),
    # greedy answers to one prompt are n identical copies at n times the compute
    (["generation.n=4"], "generation.n", "is 4 with greedy decoding, which makes 4 identical answers; "
                                         "set generation.greedy=false to sample them, or generation.n=1"),
])
def test_settings_are_refused_naming_their_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        compose_stage("generate", GenerateConfig, overrides)
    assert info.value.key == key and str(info.value).startswith(f"{key}: ") and fragment in str(info.value)


def test_sampled_answers_per_prompt_and_every_prompt_are_accepted():
    cfg = compose_stage("generate", GenerateConfig, ["generation.n=4", "generation.greedy=false", "write_every=1",
                                                     "total_prompts=null", "max_prompt_tokens=1"])
    assert (cfg.generation.n, cfg.total_prompts, cfg.write_every, cfg.strict) == (4, None, 1, False)
