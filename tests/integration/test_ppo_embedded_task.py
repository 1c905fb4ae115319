"""PPO on the embedded task raises the gold reward above the SFT model it starts from.

Setup: `orlhf task` (seed 0, its defaults), then SFT, the reward model and PPO with exactly
the demo pipeline's settings and outputs (conf/pipeline/demo.yaml; the session's run of
those stages, tests/integration/conftest.py, its PPO config checked against PPO below). PPO:
40 iterations of 64 sampled responses (max 24 new tokens) over the task's 600 generation
prompts, minibatch 16, one epoch, actor lr 5e-5, critic lr 1e-3, KL coefficient 0.05, gamma
1, lambda 0.95, seed 1234, generation seed 0; about half a minute of CPU for PPO.
Evaluation: `orlhf eval` on the 200 held-out prompts, answers sampled at temperature 1 with
generation seeds 0..4 (1000 answers per model), gold reward compared per prompt and seed.
Measured: SFT 0.30 +- 0.04, PPO 0.57 +- 0.04, paired difference 0.27 +- 0.04 (and 0.30, 0.26
with PPO seeds 1 and 2).
"""

from __future__ import annotations

import pytest

from offline_rlhf.ledger import read_ledger
from tests.integration.embedded_gold import assert_settings, gold_against_sft, paired_gain

PPO = ["ppo.iterations=40", "ppo.rollout_batch=64", "ppo.minibatch=16", "ppo.micro_batch=16",
       "generation.max_new_tokens=24", "generation.seed=0", "seed=1234", "optim.lr=5e-5",
       "services.critic.optim.lr=1e-3", "ppo.kl_coef=0.05", "save_every=10", "services.reward.batch_size=64",
       "services.reference.batch_size=64", "services.critic.batch_size=64"]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, demo_stages):
    # The demo pipeline's task, SFT, RM and PPO (conftest.DemoStages: run once a session,
    # copied here); its PPO is this one, as its config records.
    run_dir = demo_stages.copy_to(tmp_path_factory.mktemp("ppo_task") / "run", ("task", "sft", "rm", "ppo"))
    assert_settings(run_dir / "ppo_actor" / "config.yaml", PPO)
    scores = gold_against_sft(run_dir, "ppo", "ppo/checkpoints")
    return run_dir, scores


def test_ppo_raises_the_gold_reward_above_sft_by_more_than_two_standard_errors(ppo_run):
    _, scores = ppo_run
    mean, se, sft_se = paired_gain(scores, "ppo")
    assert mean > 2 * se and mean > 2 * sft_se, (mean, se, sft_se)


def test_every_module_has_its_ledger_rows(ppo_run):
    run_dir, _ = ppo_run
    hours = {row.stage: row.device_hours for row in read_ledger(run_dir) if row.stage.startswith("ppo_")}
    assert set(hours) == {"ppo_actor", "ppo_reward", "ppo_reference", "ppo_critic"}
    assert all(value > 0 for value in hours.values())
