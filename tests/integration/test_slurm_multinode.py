"""`orlhf launch` on the two simulated nodes of scripts/local_slurm.sh (n1, n2): the PPO stage
as a real heterogeneous job with its components on both nodes, a failing PPO component
cancelling the evaluation behind it, and a training stage data-parallel across both nodes
giving the weights of the same stage run in one process."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from offline_rlhf.checkpoint import latest_checkpoint, load_checkpoint, read_meta
from offline_rlhf.cli import main as orlhf
from offline_rlhf.ledger import read_ledger
from offline_rlhf.models.llama import Transformer
from tests.integration.conftest import OASST_TREES, SELF_INSTRUCT
from tests.integration.test_slurm_launch import job_outputs, orlhf_launch, slurm, status_rows  # noqa: F401
from tests.synthetic_preferences import preference_records, synthetic_tokenizer
from tests.unit.ppo.tiny_models import write_checkpoints

pytestmark = pytest.mark.slow
POLL_TIMEOUT_S = 300
# Both options, so the four modules fit two nodes (Slurm gives each component nodes of its own).
TWO_NODE_PPO = {"reward_with_critic": True, "reference_with_actor": True}
TINY_PPO = ["ppo.rollout_batch=8", "ppo.minibatch=4", "ppo.micro_batch=2", "generation.max_new_tokens=8",
            "services.startup_timeout_s=120", "services.request_timeout_s=60", "logging.progress=false",
            "ppo.iterations=2"]


def hydra_list(items: list[str]) -> str:
    """A list of overrides as one pipeline value: each item quoted (they hold '=')."""
    return "[" + ", ".join("'" + item.replace("\\", "\\\\").replace("'", "\\'") + "'" for item in items) + "]"


def entry(stage: str, overrides: list[str], **fields) -> str:
    extra = "".join(f", {key}: {_plain(value)}" for key, value in fields.items())
    return f"{{stage: {stage}, overrides: {hydra_list(overrides)}{extra}}}"


def _plain(value) -> str:
    """A number or a flat mapping of booleans, as Hydra reads it."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {str(flag).lower()}" for key, flag in value.items()) + "}"
    return str(value)


def submit(run_dir: Path, *entries: str) -> float:
    """Launch `entries` as the pipeline; returns the monotonic time of submission."""
    proc = orlhf_launch("pipeline=smoke", "cluster=local_slurm", f"run_dir={run_dir}",
                        f"pipeline.stages=[{', '.join(entries)}]")
    assert proc.returncode == 0, proc.stderr
    return time.monotonic()


def wait_finished(run_dir: Path, during=lambda: None) -> dict[str, str]:
    """Poll `orlhf launch status` until every job has ended, calling `during` each time."""
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while time.monotonic() < deadline:
        during()
        states = {stage: state for stage, _, state in status_rows(run_dir)}
        if all(state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") for state in states.values()):
            return states
        time.sleep(0.5)
    pytest.fail(f"jobs still unfinished after {POLL_TIMEOUT_S} s: {states}\n{job_outputs(run_dir)}")


def command_lines() -> list[bytes]:
    """The argv of every process of this machine (as `ps` shows them)."""
    lines = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            lines.append((proc / "cmdline").read_bytes())
        except OSError:
            continue  # ended meanwhile
    return lines


def component_nodes(job_id: str) -> list[str]:
    """Each het-job component's node list, in het group order (scontrol keeps ended jobs a while)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return re.findall(r"^\s+NodeList=(\S+)$", out, flags=re.M)


def ppo_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    tokenizer = tmp_path / "tokenizer"
    synthetic_tokenizer(tokenizer)
    write_checkpoints(run_dir, tokenizer)
    (run_dir / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n"
                                                   for r in preference_records(16)))
    return run_dir


def ppo_overrides(run_dir: Path, *extra: str) -> list[str]:
    return [f"sources=[{{name: p, kind: prompts, path: '{run_dir / 'prompts.jsonl'}'}}]", *TINY_PPO, *extra]


def test_ppo_heterogeneous_job_spreads_over_both_nodes_and_books_every_module(slurm, tmp_path):  # noqa: F811
    run_dir = ppo_run(tmp_path)
    # The critic as a world of its own: TP=2 over two tasks of its component's node; the
    # actor a data-parallel world of two processes (torchrun) on its node.
    critic_world = ("services.critic.nproc=2", "services.critic.parallel.tp=2")
    submitted = submit(run_dir, entry("ppo", ppo_overrides(run_dir, *critic_world), ppo=TWO_NODE_PPO, nproc=2))
    token = (run_dir / "ppo" / "token").read_text().strip().encode()
    seen = []  # every argv on this machine while the job runs
    states = wait_finished(run_dir, lambda: seen.extend(command_lines()))
    wall = time.monotonic() - submitted
    assert states["ppo"] == "COMPLETED", job_outputs(run_dir) + "".join(
        p.read_text() for p in run_dir.glob("ppo/*/service.log"))
    print(f"PPO heterogeneous job: submitted to finished in {wall:.1f} s")
    [(job_id, _)] = [(job, s) for stage, job, s in status_rows(run_dir) if stage == "ppo"]
    actor_nodes, service_nodes = component_nodes(job_id)
    assert {actor_nodes, service_nodes} == {"n1", "n2"}
    for name in ("critic", "reward"):  # served from their component's node, found there by the actor
        log = (run_dir / "ppo" / name / "service.log").read_text()
        assert f"{name} service ready on http://{service_nodes}:" in log
    assert "(2 process(es), TP=2 x DP=1;" in (run_dir / "ppo" / "critic" / "service.log").read_text()
    assert (run_dir / "ppo" / "DONE").read_text().strip().endswith("step_00000002")
    rows = {row.stage: row for row in read_ledger(run_dir)}
    assert set(rows) == {"ppo_actor", "ppo_critic", "ppo_reference", "ppo_reward"}
    assert all(row.status == "completed" and row.job_id == job_id and row.device_hours > 0 for row in rows.values())
    assert {stage: row.processes for stage, row in rows.items()} == {
        "ppo_actor": 2, "ppo_critic": 2, "ppo_reference": 1, "ppo_reward": 1}
    assert rows["ppo_actor"].nodes == 1
    modules = {stage.strip(): hours for stage, job, _, hours in _status_with_hours(run_dir) if stage != "ppo"}
    assert set(modules) == set(rows) and all(hours.endswith("(ledger)") for hours in modules.values())
    assert oct((run_dir / "ppo" / "token").stat().st_mode & 0o777) == "0o600"
    script = (run_dir / "ppo" / "submission.sh").read_text()
    assert token.decode() not in script and "PPO_TOKEN_FILE=" in script
    assert any(b"serve=critic" in line for line in seen)  # the services were seen running ...
    assert not any(token in line for line in seen)  # ... and the token never was in `ps`


def _status_with_hours(run_dir: Path) -> list[tuple[str, str, str, str]]:
    proc = orlhf_launch("status", f"run_dir={run_dir}")
    header, *lines = proc.stdout.splitlines()
    starts = [header.index(title) for title in ("STAGE", "JOB", "STATE", "DEVICE-HOURS")] + [None]
    return [tuple(line[a:b].strip() for a, b in zip(starts, starts[1:])) for line in lines]


def test_a_failing_ppo_component_fails_the_job_and_cancels_the_evaluation(slurm, tmp_path):  # noqa: F811
    """The reward service is given a reward model without the reward statistics PPO
    normalizes with (a model of the wrong kind is refused at launch now): only the running
    service finds out, its job step fails, and so the whole job."""
    run_dir = ppo_run(tmp_path)
    _, unnormalized = write_checkpoints(tmp_path / "no_stats", tmp_path / "tokenizer", stats=None)
    sft, ppo = run_dir / "sft" / "checkpoints", run_dir / "ppo" / "checkpoints"
    evaluation = ["prompt_key=prompt", f"prompts={run_dir / 'prompts.jsonl'}", f"rm={run_dir / 'rm' / 'checkpoints'}",
                  f"models=[{{name: sft, checkpoint: '{sft}'}}, {{name: ppo, checkpoint: '{ppo}'}}]",
                  "generation.max_new_tokens=8"]  # the tiny SFT's context is 64 tokens
    submit(run_dir, entry("ppo", ppo_overrides(run_dir, f"services.reward.checkpoint={unnormalized}"),
                          ppo=TWO_NODE_PPO), entry("eval", evaluation))
    states = wait_finished(run_dir)
    assert (states["ppo"], states["eval"]) == ("FAILED", "CANCELLED"), job_outputs(run_dir)
    log = (run_dir / "ppo" / "reward" / "service.log").read_text()
    assert "services.reward.checkpoint" in log and "stores no reward statistics" in log
    assert "a PPO job step failed" in job_outputs(run_dir)


def sft_overrides(init: Path) -> list[str]:
    """From a saved model (a random initialization is drawn differently per world size)."""
    sources = (f"data.sources=[{{name: oasst, format: oasst, path: '{OASST_TREES.resolve()}'}}, "
               f"{{name: self_instruct, format: self_instruct, path: '{SELF_INSTRUCT.resolve()}'}}]")
    return [f"init.checkpoint={init}", "data.max_seq_len=64", sources, "train.global_batch=8", "train.micro_batch=4",
            "train.max_steps=3", "train.save_every=3", "optim.lr=3e-3", "logging.progress=false"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = latest_checkpoint(run_dir / "sft" / "checkpoints")
    model = Transformer(read_meta(checkpoint).model)
    load_checkpoint(checkpoint, model)
    return model.state_dict()


def test_a_stage_data_parallel_across_two_nodes_matches_one_process(slurm, tmp_path):  # noqa: F811
    synthetic_tokenizer(tmp_path / "tokenizer")
    init, _ = write_checkpoints(tmp_path / "init", tmp_path / "tokenizer")
    run_dir = tmp_path / "two_nodes"
    submitted = submit(run_dir, entry("sft", sft_overrides(init), nodes=2, nproc=2))
    states = wait_finished(run_dir)
    wall = time.monotonic() - submitted
    assert states == {"sft": "COMPLETED"}, job_outputs(run_dir)
    print(f"two-node sft stage: submitted to finished in {wall:.1f} s")
    [row] = read_ledger(run_dir)
    assert (row.stage, row.nodes, row.processes, row.status) == ("sft", 2, 2, "completed")
    assert component_nodes(row.job_id) == ["n[1-2]"]
    single = tmp_path / "one_process"
    assert orlhf(["sft", f"run_dir={single}", *sft_overrides(init)]) == 0
    expected, got = final_weights(single), final_weights(run_dir)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_slurms_warning_makes_the_ppo_actor_save_and_its_services_record_their_rows(slurm, tmp_path):  # noqa: F811
    """Was: the PPO job got no warning, and at its time limit every step was killed at once
    (no save since the last save_every, services without a row). `scancel --signal=USR1`
    stands in for `#SBATCH --signal=USR1@N` (test_slurm_stop_signal.py)."""
    run_dir = ppo_run(tmp_path)
    overrides = [item for item in ppo_overrides(run_dir) if not item.startswith("ppo.iterations=")]
    submit(run_dir, entry("ppo", [*overrides, "ppo.iterations=500", "save_every=1000"], ppo=TWO_NODE_PPO, nproc=2))
    [(_, job_id, _)] = status_rows(run_dir)
    metrics, deadline = run_dir / "ppo" / "metrics.jsonl", time.monotonic() + POLL_TIMEOUT_S
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=60)
    states = wait_finished(run_dir)
    output = job_outputs(run_dir)
    assert states["ppo"] == "FAILED", output  # torchrun's status for its workers' 75, as for a training stage
    saved = re.search(r"ppo: stopped by a signal \(SIGTERM/SIGUSR1/Ctrl-C\) after saving step (\d+) of 500", output)
    assert saved and latest_checkpoint(run_dir / "ppo" / "checkpoints").name == f"step_{int(saved[1]):08d}", output
    rows = {row.stage: row.status for row in read_ledger(run_dir)}
    assert rows == {"ppo_actor": "interrupted", "ppo_critic": "completed", "ppo_reference": "completed",
                    "ppo_reward": "completed"}, output
