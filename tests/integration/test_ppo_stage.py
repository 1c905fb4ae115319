"""`orlhf ppo` end to end on tiny checkpoints: outputs, ledger rows per module, faults
(a killed critic fails the run with one line naming it; a killed actor takes its services
down), and a killed run resuming to the same final weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offline_rlhf.checkpoint import (
    REWARD_STATS,
    TEMPLATE,
    CheckpointMeta,
    TrainState,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from offline_rlhf.cli import main as orlhf
from offline_rlhf.ledger import HEARTBEAT_DIR, read_ledger
from offline_rlhf.train.loop import STOPPED_EXIT_CODE
from tests.fixtures import REPO_ROOT, reference_model
from tests.synthetic_preferences import MODEL, preference_records, synthetic_tokenizer
from tests.unit.ppo.tiny_models import STATS, write_checkpoints
from tests.unit.test_hub import hub_repo, offline_hub

TINY_RUN = ["ppo.rollout_batch=8", "ppo.minibatch=4", "ppo.micro_batch=2", "generation.max_new_tokens=8",
            "services.startup_timeout_s=120", "services.request_timeout_s=60", "logging.progress=false",
            "optim.lr=1e-3", "services.critic.optim.lr=1e-3"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_stage") / "tokenizer"
    synthetic_tokenizer(out)
    return out


def prepare(run_dir: Path, tokenizer_dir: Path, sft_metadata: dict | None = None) -> Path:
    write_checkpoints(run_dir, tokenizer_dir, sft_metadata=sft_metadata)
    prompts = run_dir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in preference_records(16)))
    return run_dir


def command(run_dir: Path, *overrides: str) -> list[str]:
    source = f"sources=[{{name: p, kind: prompts, path: '{run_dir / 'prompts.jsonl'}'}}]"
    return [sys.executable, "-m", "offline_rlhf.cli", "ppo", f"run_dir={run_dir}", source, *TINY_RUN, *overrides]


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(command(run_dir, *overrides), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def service_pids(run_dir: Path) -> list[int]:
    """Every live process started for a service of this run (found by its environment)."""
    marker = f"PPO_SERVICE_CONFIG={run_dir}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes() and "Z" not in (proc / "stat").read_text().split()[2]:
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "ppo" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model = reference_model(MODEL, "lm", seed=5)
    load_checkpoint(resolve_checkpoint(run_dir / "ppo" / "checkpoints"), model)
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.fixture
def cleanup():
    runs = []
    yield runs.append
    for run_dir in runs:
        for pid in service_pids(run_dir):
            os.kill(pid, signal.SIGKILL)


def test_a_run_writes_checkpoints_metrics_done_and_a_ledger_row_per_module(tmp_path, tokenizer_dir, cleanup):
    """The SFT records its own tags: the actor's checkpoints record them again, as eval reads them."""
    template = {"kind": "paper", "user_tag": "Q:", "assistant_tag": "A:", "sep": " "}
    run_dir = prepare(tmp_path / "run", tokenizer_dir, {TEMPLATE: template})
    cleanup(run_dir)
    result = subprocess.run(command(run_dir, "ppo.iterations=2"), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_dir / "ppo"
    final = Path((out / "DONE").read_text().strip())
    assert final == out / "checkpoints" / "step_00000002" and (final / "tokenizer" / "tokenizer.json").is_file()
    assert read_meta(final).metadata[TEMPLATE] == template
    rows = metric_rows(run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    for key in ("reward_mean", "kl", "clip_frac", "approx_kl", "entropy", "value_loss", "explained_variance",
                "response_length", "tokens_per_s", "time_generate", "time_services", "time_train"):
        assert f"train/{key}" in rows[0], key
    assert (out / "critic" / "checkpoints" / "step_00000002").is_dir()
    assert oct((out / "token").stat().st_mode & 0o777) == "0o600"
    stages = {row.stage: row for row in read_ledger(run_dir)}
    assert set(stages) == {"ppo_actor", "ppo_reward", "ppo_reference", "ppo_critic"}
    assert all(row.status == "completed" and row.device_hours > 0 for row in stages.values())
    assert service_pids(run_dir) == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_critic_fails_the_run_with_one_line_naming_it(tmp_path, tokenizer_dir, cleanup, sig):
    """SIGTERM (Slurm's time limit, the actor's last resort) lets the critic write its ledger
    row, as interrupted; it used to die at once and leave only a heartbeat, as SIGKILL does."""
    run_dir = prepare(tmp_path / "run", tokenizer_dir)
    cleanup(run_dir)
    actor = start(run_dir, "ppo.iterations=500")
    try:
        wait_for(lambda: len(metric_rows(run_dir)) >= 1 or actor.poll() is not None, 180, "a first iteration")
        critic = json.loads((run_dir / "ppo" / "critic" / "address.json").read_text())["pid"]
        os.kill(critic, sig)
        killed = time.monotonic()
        _, stderr = actor.communicate(timeout=60)
    finally:
        actor.kill()
    assert actor.returncode != 0
    assert time.monotonic() - killed < 60
    last = stderr.strip().splitlines()[-1]
    assert "critic" in last and str(run_dir / "ppo" / "critic" / "service.log") in last, stderr[-2000:]
    wait_for(lambda: not service_pids(run_dir), 30, "the other services to exit")
    stages = {row.stage: row.status for row in read_ledger(run_dir)}
    assert {"ppo_actor", "ppo_reward", "ppo_reference"} <= set(stages)
    assert stages.get("ppo_critic") == (None if sig == signal.SIGKILL else "interrupted")
    assert (run_dir / HEARTBEAT_DIR / "ppo_critic.json").exists() == (sig == signal.SIGKILL)


def test_a_stop_signal_saves_the_iteration_and_a_rerun_resumes_there(tmp_path, tokenizer_dir, cleanup):
    """SIGTERM (the launcher's Ctrl-C, Slurm's warning): the actor finishes its iteration,
    saves it, shuts its services down and exits 75; it used to exit at once, losing every
    iteration since the last `save_every`."""
    run_dir = prepare(tmp_path / "run", tokenizer_dir)
    cleanup(run_dir)
    actor = start(run_dir, "ppo.iterations=500", "save_every=100")
    try:
        wait_for(lambda: len(metric_rows(run_dir)) >= 1 or actor.poll() is not None, 180, "a first iteration")
        actor.send_signal(signal.SIGTERM)
        stdout, stderr = actor.communicate(timeout=120)
    finally:
        actor.kill()
    assert actor.returncode == STOPPED_EXIT_CODE, stderr[-3000:]
    saved = resolve_checkpoint(run_dir / "ppo" / "checkpoints")
    iterations = int(saved.name.removeprefix("step_"))
    assert 1 <= iterations < 100 and f"after saving step {iterations} of 500" in stdout
    assert (run_dir / "ppo" / "critic" / "checkpoints" / saved.name).is_dir()
    wait_for(lambda: not service_pids(run_dir), 30, "the services to exit")
    assert {row.stage: row.status for row in read_ledger(run_dir)} == {
        "ppo_actor": "interrupted", "ppo_reward": "completed", "ppo_reference": "completed", "ppo_critic": "completed"}
    result = subprocess.run(command(run_dir, f"ppo.iterations={iterations + 1}"), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {saved}" in result.stdout
    assert [row["step"] for row in metric_rows(run_dir)][-1] == iterations + 1


def test_a_rerun_over_a_reward_model_trained_again_refuses_to_go_on(tmp_path, tokenizer_dir, cleanup):
    """The critic grew from the old reward model and the rewards came from it: going on
    would mix two runs. Refused in one line before any service starts; the outputs stand.
    (The first run's critic ends inside its warmup, which the console says.)"""
    run_dir = prepare(tmp_path / "run", tokenizer_dir)
    cleanup(run_dir)
    warmup = "services.critic.optim.warmup_steps=1000"
    result = subprocess.run(command(run_dir, "ppo.iterations=1", warmup), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: services.critic.optim.warmup_steps=1000 is not below the run's" in result.stdout
    done = (run_dir / "ppo" / "DONE").read_text()
    rm = run_dir / "rm" / "checkpoints"
    shutil.rmtree(rm)  # trained again: the same path, other weights
    save_checkpoint(rm, reference_model(MODEL, "value", seed=2),
                    CheckpointMeta(MODEL, "value", TrainState(step=3), metadata={REWARD_STATS: STATS}),
                    tokenizer_dir=tokenizer_dir)
    result = subprocess.run(command(run_dir, "ppo.iterations=2", warmup), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.splitlines()
    assert line.startswith("orlhf ppo: error: services.critic.checkpoint's step: differs from the run that wrote "
                           f"{run_dir / 'ppo'} (2 changed: services.critic.checkpoint's step, "
                           "services.reward.checkpoint's step; ") and "now step_00000003" in line, line
    assert (run_dir / "ppo" / "DONE").read_text() == done


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, tokenizer_dir, cleanup):
    overrides = ("ppo.iterations=4", "save_every=1")
    straight = prepare(tmp_path / "straight", tokenizer_dir)
    cleanup(straight)
    result = subprocess.run(command(straight, *overrides), cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = prepare(tmp_path / "killed", tokenizer_dir)
    cleanup(killed)
    actor = start(killed, *overrides)
    try:
        wait_for(lambda: len(metric_rows(killed)) >= 2 or actor.poll() is not None, 180, "two iterations")
        assert actor.poll() is None, "the run ended before it could be killed"
        actor.send_signal(signal.SIGKILL)
        actor.wait(30)
    finally:
        actor.kill()
    # The services notice the actor is gone and exit on their own, their rows saying they stopped early.
    wait_for(lambda: not service_pids(killed), 60, "the services of the killed actor to exit")
    assert not (killed / "ppo" / "DONE").exists()
    services = [f"ppo_{name}" for name in ("reward", "reference", "critic")]
    assert sorted((row.stage, row.status) for row in read_ledger(killed) if row.stage in services) == \
        sorted((stage, "interrupted") for stage in services)
    result = subprocess.run(command(killed, *overrides), cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    expected, got = final_weights(straight), final_weights(killed)
    sft = reference_model(MODEL, "lm", seed=0).state_dict()
    assert not torch.equal(expected["output.weight"], sft["output.weight"])
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)


def test_services_run_as_torchrun_worlds_of_their_own_layout(tmp_path, tokenizer_dir, cleanup):
    run_dir = prepare(tmp_path / "run", tokenizer_dir)
    cleanup(run_dir)
    result = subprocess.run(command(run_dir, "ppo.iterations=1", "services.critic.nproc=2",
                                    "services.critic.parallel.tp=2", "services.reference.nproc=2"),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 process(es), TP=2 x DP=1;" in (run_dir / "ppo" / "critic" / "service.log").read_text()
    assert "(2 process(es), TP=1 x DP=2;" in (run_dir / "ppo" / "reference" / "service.log").read_text()
    processes = {row.stage: row.processes for row in read_ledger(run_dir)}
    assert processes == {"ppo_actor": 1, "ppo_reward": 1, "ppo_reference": 2, "ppo_critic": 2}
    assert service_pids(run_dir) == []


def test_the_actor_and_its_reference_start_from_a_hugging_face_repo_id(tmp_path, tokenizer_dir, cleanup, monkeypatch):
    """init.checkpoint and services.reference.checkpoint name a hub repo (a local hub cache,
    offline): it is imported once into the run, and both modules load that import."""
    run_dir = prepare(tmp_path / "run", tokenizer_dir)
    cleanup(run_dir)
    exported = tmp_path / "exported"
    assert orlhf(["convert", "export_hf", f"ckpt={run_dir / 'sft' / 'checkpoints'}", f"out={exported}",
                  "head=lm"]) == 0
    hub_repo(offline_hub(monkeypatch, tmp_path / "hub"), "tiny-org/ppo-sft", exported)
    shutil.rmtree(run_dir / "sft")  # the hub copy is the only one
    result = subprocess.run(command(run_dir, "ppo.iterations=1", "init.checkpoint=tiny-org/ppo-sft",
                                    "services.reference.checkpoint=tiny-org/ppo-sft"),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (run_dir / "imported").iterdir()] == ["tiny-org--ppo-sft"]
    imported = str(run_dir / "imported" / "tiny-org--ppo-sft")
    assert imported in (run_dir / "ppo" / "reference" / "service.log").read_text()
    assert (run_dir / "ppo" / "DONE").is_file()
