"""`orlhf ppo`'s config refuses what cannot run, at config time, naming the full key: a
service's settings under services.NAME. (never the actor's parallel.tp or optim.lr), what a
service would only find out at start-up (its world's split, the critic's minibatch split, a
host that would break its URL), and sampling settings the PPO log-probs do not follow."""

from __future__ import annotations

import dataclasses

import pytest

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from ppo_baseline.config import PPOConfig, ServiceConfig, ServiceSettings
from tests.unit.ppo.tiny_models import PPO


@pytest.mark.parametrize("overrides,error", [
    (["ppo.gamma=1.5"], r"ppo.gamma: must be in \[0, 1\], got 1.5"),
    (["ppo.gamma=nan"], r"ppo.gamma: must be in \[0, 1\], got nan"),
    (["ppo.lam=-0.1"], r"ppo.lam: must be in \[0, 1\], got -0.1"),
    (["ppo.clip=0"], r"ppo.clip: must be positive, got 0.0"),
    (["ppo.value_clip=-1"], r"ppo.value_clip: must be positive, got -1.0"),
    (["ppo.kl_coef=-1"], r"ppo.kl_coef: must be >= 0, got -1.0"),
    (["services.critic.nproc=0"], r"services.critic.nproc: must be positive, got 0"),
    (["services.reward.batch_size=-1"], r"services.reward.batch_size: must be positive, got -1"),
    (["services.reference.het_group=0"], r"services.reference.het_group: must be >= 1 \(group 0 is the actor's\)"),
    (["services.critic.optim.lr=-1"], r"services.critic.optim.lr: must be > 0, got -1.0"),
    (["services.critic.optim.beta2=1"], r"services.critic.optim.beta2: must be in \[0, 1\), got 1.0"),
    (["services.reward.parallel.tp=0"], r"services.reward.parallel.tp: must be >= 1, got 0"),
    (["services.reward.parallel.dp_mode=zero"], r"services.reward.parallel.dp_mode: unknown mode 'zero'"),
])
def test_an_error_names_the_full_key_it_is_about(overrides, error):
    with pytest.raises(ConfigError, match=f"^{error}"):
        compose_stage("ppo", PPOConfig, overrides)


@pytest.mark.parametrize("overrides,error", [
    (["services.critic.parallel.tp=2"], r"services.critic.parallel.tp: 2 does not divide the world size 1; "
                                        r"launch a multiple of 2 processes or change services.critic.parallel.tp$"),
    (["services.reference.parallel.dp=2"],
     r"services.reference.parallel.dp: tp=1 x dp=2 = 2 but the world size is 1; "
     r"set services.reference.parallel.dp=1 or services.reference.parallel.dp=-1$"),
    (["services.reward.nproc=2", "services.reward.parallel.tp=2", "services.reward.parallel.dp_mode=ddp"],
     r"services.reward.parallel.dp_mode: ddp cannot be combined with tensor parallelism"),
    (["services.critic.nproc=3"], r"services.critic.nproc: the critic's minibatch of 128 does not split into "
                                  r"micro-batches of 8 on 3 data-parallel ranks"),
    (["services.critic.nproc=4", "services.critic.parallel.tp=2", "ppo.minibatch=8", "ppo.micro_batch=8",
      "ppo.rollout_batch=16"], r"services.critic.nproc: the critic's minibatch of 8 does not split into "
                               r"micro-batches of 8 on 2 data-parallel ranks"),
    (["services.critic.nproc=2", "services.critic.parallel.tp=2", "services.critic.parallel.sequence_parallel=true"],
     r"services.critic.parallel.sequence_parallel: is not supported by the PPO critic \(rollout rows have any "
     r"length; sequence parallelism splits every row evenly over the TP ranks\); "
     r"set services.critic.parallel.sequence_parallel=false$"),
    (["services.critic.parallel.sequence_parallel=true"],
     r"services.critic.parallel.sequence_parallel: needs services.critic.parallel.tp > 1"),
    (["services.host='a b'"], r"services.host: 'a b' is not a host name or IP address"),
    (["services.host='h/x'"], r"services.host: 'h/x' is not a host name"),
    (["services.host='user@h'"], r"services.host: 'user@h' is not a host name"),
    (["services.host=''"], r"services.host: '' is not a host name"),
    (["services.host='fe80::1%eth0'"], r"services.host: 'fe80::1%eth0' is not a host name"),
    (["services.host=-node"], r"services.host: '-node' is not a host name"),
])
def test_what_a_service_would_fail_on_at_start_up_fails_at_config_time(overrides, error):
    with pytest.raises(ConfigError, match=f"^{error}"):
        compose_stage("ppo", PPOConfig, overrides)


def test_service_layouts_that_run_compose_and_the_actors_keys_stay_its_own(tmp_path):
    # The reward model's DP of 3 need not split a minibatch; it pads rows for sequence parallelism.
    cfg = compose_stage("ppo", PPOConfig, [f"run_dir={tmp_path}", "services.critic.nproc=4",
                                           "services.critic.parallel.tp=2", "services.reference.nproc=2",
                                           "services.reference.parallel.dp=2", "services.reward.nproc=6",
                                           "services.reward.parallel.tp=2",
                                           "services.reward.parallel.sequence_parallel=true"])
    assert (cfg.services.critic.nproc, cfg.services.critic.parallel.tp, cfg.services.reward.nproc) == (4, 2, 6)
    for host in ("::1", "10.0.0.5", "localhost", "node-01.cluster", "gpu_007"):
        assert compose_stage("ppo", PPOConfig, [f"services.host={host}"]).services.host == host
    with pytest.raises(ConfigError, match=r"^parallel.tp: must be >= 1"):
        compose_stage("ppo", PPOConfig, ["parallel.tp=0"])
    with pytest.raises(ConfigError, match=r"^optim.lr: must be > 0"):
        compose_stage("ppo", PPOConfig, ["optim.lr=-1"])


@pytest.mark.parametrize("service,key,value,expected", [("reward", "lr", "1e-5", 1e-5),
                                                       ("reference", "weight_decay", "0.1", 0.1),
                                                       ("reward", "schedule", "cosine", "cosine")])
def test_an_optimizer_setting_for_a_service_that_does_not_train_is_refused(service, key, value, expected):
    """Was: accepted and ignored (only the critic trains); the critic's own is kept."""
    full = f"services.{service}.optim.{key}"
    with pytest.raises(ConfigError, match=rf"^{full}: is not used: only the critic trains, the {service} service "
                                          rf"only answers forwards; remove {full}$"):
        compose_stage("ppo", PPOConfig, [f"{full}={value}"])
    critic = compose_stage("ppo", PPOConfig, [f"services.critic.optim.{key}={value}"]).services.critic.optim
    assert getattr(critic, key) == expected
    # A service process refuses it too (from its JSON).
    good = ServiceConfig(name="reward", ppo=PPO, settings=ServiceSettings(checkpoint="rm"))
    with pytest.raises(ConfigError, match=r"^services.reward.optim.lr: is not used"):
        ServiceConfig.from_json(good.to_json().replace('"lr": 9e-06', '"lr": 1e-05'))


@pytest.mark.parametrize("override,plain", [("generation.temperature=0.7", "1"), ("generation.top_p=0.9", "1"),
                                            ("generation.top_k=40", "0")])
def test_sampling_other_than_the_policys_own_distribution_is_refused(override, plain):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: PPO samples from the policy itself, whose log-probs "
                                          rf"\(temperature 1, whole vocabulary\) feed its ratio and KL; "
                                          rf"set {key}={plain}$"):
        compose_stage("ppo", PPOConfig, [override])


def test_a_service_process_config_is_checked_under_its_name_too():
    """A service started from its JSON (python -m ppo_baseline.serve) checks what the actor did."""
    good = ServiceConfig(name="critic", ppo=PPO, settings=ServiceSettings(checkpoint="rm"))
    assert ServiceConfig.from_json(good.to_json()) == good
    with pytest.raises(ConfigError, match=r"^services.critic.nproc: the critic's minibatch of 4 does not split"):
        ServiceConfig(name="critic", ppo=PPO, settings=ServiceSettings(checkpoint="rm", nproc=3))
    tp = good.to_json().replace('"tp": 1', '"tp": 2')
    with pytest.raises(ConfigError, match=r"^services.critic.parallel.tp: 2 does not divide the world size 1"):
        ServiceConfig.from_json(tp)
    with pytest.raises(ConfigError, match=r"^services.reward.optim.lr: must be > 0"):
        ServiceConfig.from_json(good.to_json().replace('"lr": 9e-06', '"lr": -1').replace('"critic"', '"reward"'))
    with pytest.raises(ConfigError, match=r"^services.host: 'a b'"):
        dataclasses.replace(good, host="a b")


def test_a_service_started_by_hand_says_who_starts_it(monkeypatch, capsys):
    """Was: a KeyError traceback for PPO_SERVICE_CONFIG."""
    from ppo_baseline import serve

    monkeypatch.delenv(serve.CONFIG_ENV, raising=False)
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    assert serve.main() == 2
    assert capsys.readouterr().err == (f"python -m ppo_baseline.serve: {serve.CONFIG_ENV} and {serve.TOKEN_ENV} not "
                                       "set: the PPO actor starts its services itself; run `orlhf ppo ...` (or "
                                       "`orlhf ppo serve=NAME` in a Slurm job of `orlhf launch`)\n")
