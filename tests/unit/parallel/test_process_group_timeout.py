"""`parallel.timeout_min`: validated at start, and the timeout the default process group gets."""

from datetime import timedelta

import pytest

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.tools import SmokeConfig
from offline_rlhf.parallel import distributed
from offline_rlhf.parallel.distributed import DistEnv, init_distributed


@pytest.mark.parametrize("value", ["1", "0", "-5", "nan", "inf", "20000"])
def test_a_timeout_too_short_for_the_keepalive_or_past_a_week_is_refused(value):
    with pytest.raises(ConfigError) as info:
        compose_stage("smoke", SmokeConfig, [f"parallel.timeout_min={value}"])
    assert str(info.value).startswith("parallel.timeout_min: must be between 2 and 10080 (minutes, a week), got ")


def test_the_default_group_gets_the_configured_timeout(monkeypatch):
    assert compose_stage("smoke", SmokeConfig, []).parallel.timeout_min == 30  # NCCL's own default is 10
    cfg = compose_stage("smoke", SmokeConfig, ["parallel.timeout_min=90"])
    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    env = DistEnv(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1", master_port=1, launcher="torchrun")
    init_distributed(env, timedelta(minutes=cfg.parallel.timeout_min))
    assert seen["timeout"] == timedelta(minutes=90) and seen["backend"] == "gloo"
    init_distributed(env)
    assert seen["timeout"] == timedelta(minutes=30)
