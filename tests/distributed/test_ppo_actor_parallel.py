"""The PPO actor over a world of processes gives what one process gives.

In gloo worlds: the sampling replica of a sharded policy holds its weights and samples the
rows one process samples, in prompt order. End to end (`orlhf ppo` under torchrun, real
services): DP=2 (FSDP and DDP), TP=2 and TP=2 x DP=2 actors end two PPO iterations with
the weights and per-module ledger tokens of a one-process actor started from the same
saved SFT checkpoint; a world-2 actor resumes a checkpoint written under another layout to
those weights too; a layout that cannot split the minibatch and a failing service end a
world-2 actor with one line naming the cause."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from offline_rlhf.config.schema import GenerationConfig, ParallelConfig
from offline_rlhf.generation.engine import DecodeSession
from offline_rlhf.ledger import read_ledger
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.parallel.distributed import detect_env, device_for
from offline_rlhf.parallel.parallelize import build_mesh, build_model
from offline_rlhf.parallel.state_dict import load_full_state_dict
from ppo_baseline.actor import iteration_generation, policy_logprobs, refresh, sample, sampling_model
from tests.distributed.launch import run_distributed
from tests.fixtures import REPO_ROOT, TINY, reference_model, runtime_for
from tests.integration.test_ppo_stage import command, final_weights, metric_rows, prepare, service_pids
from tests.synthetic_preferences import MODEL, synthetic_tokenizer

GEN = GenerationConfig(greedy=False, max_new_tokens=6, batch_size=3, seed=7)
# Prompts of different lengths, so the replicas' blocks have different widths to pad.
PROMPTS = [[1, 5, 9], [1, 7], [1, 4, 4, 4, 4], [1, 8, 3], [1, 9], [1, 2, 3, 4, 5, 6], [1, 6, 6], [1, 3]]
PROMPT_IDS = [10, 11, 12, 13, 14, 15, 16, 17]
TWO_ITERATIONS = ("ppo.iterations=2", "save_every=1")


def _rollout_in_world(rank, world_size, parallel):
    """Train-layout policy (weights of the reference, then perturbed like a step would),
    its sampling replica refreshed, one rollout and its old log-probs."""
    dims = ParallelDims.build(ParallelConfig(**parallel), world_size, TINY)
    device = device_for(detect_env())
    rt = runtime_for(dims, build_mesh(dims, device), Path("/tmp"))
    model = build_model(TINY, "lm", dims, rt.mesh, rt.device)
    load_full_state_dict(model, _trained_reference().state_dict())
    replica = sampling_model(model, TINY, rt)
    assert (replica is model) == (dims.dp == 1)
    refresh(replica, model)
    sampler = DecodeSession(replica, rt.device, GEN)
    rollout = sample(sampler, PROMPTS, PROMPT_IDS, iteration_generation(GEN, 2), 2, 0, rt)
    weights = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
               for name, p in replica.named_parameters()}
    return {"rollout": rollout.sequences(), "old_logp": policy_logprobs(model, rollout, rt, 2), "weights": weights}


def _trained_reference():
    """The tiny policy with weights no fresh init has (a replica left at its own init fails)."""
    model = reference_model(TINY, seed=3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    return model


@pytest.mark.parametrize("parallel,world_size", [(dict(dp=2), 2), (dict(dp=2, dp_mode="ddp"), 2),
                                                 (dict(tp=2, dp=2), 4)], ids=["fsdp2", "ddp2", "tp2xdp2"])
def test_replicas_sample_the_rows_one_process_samples(tmp_path, parallel, world_size):
    model = _trained_reference()
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None, tmp_path)
    expected = sample(DecodeSession(model, rt.device, GEN), PROMPTS, PROMPT_IDS, iteration_generation(GEN, 2), 2, 0, rt)
    expected_logp = policy_logprobs(model, expected, rt, 2)
    for got in run_distributed(_rollout_in_world, world_size, tmp_path, parallel):
        for name, value in model.state_dict().items():
            torch.testing.assert_close(got["weights"][name], value, atol=0, rtol=0, msg=name)
        for key, value in expected.sequences().items():
            assert torch.equal(got["rollout"][key], value), key
        torch.testing.assert_close(got["old_logp"], expected_logp, atol=1e-5, rtol=1e-5)


# End to end: `orlhf ppo`, one process or a torchrun world of two, from the same checkpoints.

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_actor") / "tokenizer"
    synthetic_tokenizer(out)
    return out


@dataclass
class Outcome:
    weights: dict[str, torch.Tensor]  # the actor's final weights
    tokens: Counter  # per module (ledger stage), over its rows: the tokens it generated, trained on or was sent


def outcome(run_dir: Path) -> Outcome:
    tokens = Counter()
    for row in read_ledger(run_dir):
        tokens[row.stage] += row.tokens
    return Outcome(final_weights(run_dir), tokens)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tokenizer_dir) -> Outcome:
    """A one-process actor after two iterations."""
    run_dir = prepare(tmp_path_factory.mktemp("one_process") / "run", tokenizer_dir)
    try:
        result = subprocess.run(command(run_dir, *TWO_ITERATIONS), cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=240)
    finally:
        _kill_services(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return outcome(run_dir)


def run_world(run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`orlhf ppo` as a torchrun world of `nproc` actor processes."""
    python, *stage = command(run_dir, *overrides)
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *stage]
    try:
        result = subprocess.run(torchrun, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        _kill_services(run_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _kill_services(run_dir: Path) -> None:
    """Whatever a failed run left of its services (a passing run leaves nothing)."""
    for pid in service_pids(run_dir):
        os.kill(pid, signal.SIGKILL)


def assert_same_run(got: Outcome, expected: Outcome) -> None:
    """The same weights (within float rounding) and, module by module, the same tokens: the
    same rollouts, each sent once per call to each service (by rank 0 alone)."""
    sft = reference_model(MODEL, "lm", seed=0).state_dict()  # tiny_models.write_checkpoints' SFT weights
    assert not torch.equal(expected.weights["output.weight"], sft["output.weight"]), "the actor did not train"
    for name, value in expected.weights.items():
        torch.testing.assert_close(got.weights[name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert got.tokens == expected.tokens


LAYOUTS = {  # overrides, TP, DP
    "dp2_fsdp": (["parallel.dp=2"], 1, 2),
    "dp2_ddp": (["parallel.dp=2", "parallel.dp_mode=ddp"], 1, 2),
    "tp2": (["parallel.tp=2"], 2, 1),
    # The paper's kind of layout (TP within a node, DP across): each DP rank's share of a
    # minibatch of 4 is one micro-batch of 1 (the one-process run uses 2: same update).
    "tp2xdp2": (["parallel.tp=2", "ppo.micro_batch=1"], 2, 2),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_parallel_actor_trains_to_the_one_process_weights(tmp_path, tokenizer_dir, one_process, layout):
    overrides, tp, dp = LAYOUTS[layout]
    run_dir = prepare(tmp_path / "run", tokenizer_dir)
    result = run_world(run_dir, *TWO_ITERATIONS, *overrides, nproc=tp * dp)
    assert f"on {tp * dp} actor process(es) (TP={tp} x DP={dp})" in result.stdout
    assert_same_run(outcome(run_dir), one_process)
    assert [row["step"] for row in metric_rows(run_dir)] == [1, 2]  # rank 0 alone logs
    rows = {row.stage: row for row in read_ledger(run_dir)}
    assert (rows["ppo_actor"].processes, rows["ppo_actor"].nodes) == (tp * dp, 1)
    assert {stage: row.processes for stage, row in rows.items() if stage != "ppo_actor"} == {
        "ppo_reward": 1, "ppo_reference": 1, "ppo_critic": 1}  # rank 0 started each service once
    assert service_pids(run_dir) == []


def test_a_world_of_two_resumes_a_checkpoint_of_another_layout(tmp_path, tokenizer_dir, one_process):
    run_dir = prepare(tmp_path / "run", tokenizer_dir)
    run_world(run_dir, "ppo.iterations=1", "parallel.dp=2")  # iteration 1 under DP=2, saved
    result = run_world(run_dir, *TWO_ITERATIONS, "parallel.tp=2")  # resharded to TP=2 for iteration 2
    assert "resuming from" in result.stdout and "(iteration 1)" in result.stdout
    assert (run_dir / "ppo" / "DONE").read_text().strip().endswith("step_00000002")
    assert_same_run(outcome(run_dir), one_process)
    assert [row.processes for row in read_ledger(run_dir) if row.stage == "ppo_actor"] == [2, 2]


def test_a_world_that_cannot_split_the_minibatch_fails_at_start_naming_the_setting(tmp_path, tokenizer_dir):
    run_dir = prepare(tmp_path / "run", tokenizer_dir)
    python, *stage = command(run_dir, "ppo.micro_batch=4")  # parallel.dp=-1: the two processes are DP=2
    result = subprocess.run([python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *stage],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert ("ppo.micro_batch: the actor's minibatch of 4 does not split into micro-batches of 4 on 2 "
            "data-parallel ranks") in result.stderr, result.stderr[-2000:]
    assert not (run_dir / "ppo" / "token").exists()  # refused before any service started


def test_a_failing_service_ends_a_world_of_two_naming_it(tmp_path, tokenizer_dir):
    """Rank 0 fails with the service's line; torchrun ends rank 1, which waits in a collective."""
    run_dir = prepare(tmp_path / "run", tokenizer_dir)
    python, *stage = command(run_dir, f"services.reward.checkpoint={run_dir / 'sft' / 'checkpoints'}")  # no RM
    try:
        result = subprocess.run([python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *stage],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        left = service_pids(run_dir)
    finally:
        _kill_services(run_dir)
    assert result.returncode != 0
    log = run_dir / "ppo" / "reward" / "service.log"
    assert f"orlhf ppo: error: services.reward: the reward service exited with code 1; see its log {log}" in \
        result.stderr, result.stderr[-2000:]
    assert "holds a 'lm' head, not a reward model's 'value' head" in log.read_text()
    assert left == []  # rank 0 shut the other services down
