"""`orlhf serve`'s config: an address others can reach is served only with an API key."""

from __future__ import annotations

import pytest

from offline_rlhf.cli import main
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.serving import ServeConfig


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "fe80::1", "example.org"])
def test_a_non_loopback_host_without_a_key_is_refused(host):
    with pytest.raises(ConfigError) as error:
        ServeConfig(ckpt="ckpts/model", host=host)
    assert error.value.key == "api_key_env" and f"host={host} is not a loopback address" in str(error.value)
    assert "set api_key_env=NAME" in str(error.value)
    assert ServeConfig(ckpt="ckpts/model", host=host, api_key_env="ORLHF_KEY").host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "localhost"])
def test_loopback_hosts_may_serve_without_a_key(host):
    assert ServeConfig(ckpt="ckpts/model", host=host).api_key_env == ""


def test_the_cli_refuses_it_in_one_line(capsys):
    assert main(["serve", "ckpt=ckpts/model", "host=0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "api_key_env: empty while host=0.0.0.0 is not a loopback address" in err and err.count("\n") == 1
