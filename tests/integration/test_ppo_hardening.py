"""`orlhf ppo` on tiny checkpoints, where it used to fail late or not at all: prompts fit
the reward model's recorded training length, a reward model with NaN statistics or a
critic skipping its steps fails the run without DONE (the critic's count resumes with the
actor's checkpoint), and a rerun decides before starting any service (nothing to do, a
checkpoint past ppo.iterations, a start-over clearing the critic's old checkpoints, a
resume lacking the critic's checkpoint, a changed config or rewritten prompts naming the
stage folder, each refusal leaving the finished run's DONE as it was)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from offline_rlhf.checkpoint import REWARD_STATS, CheckpointMeta, TrainState, read_meta, save_checkpoint
from offline_rlhf.labeling.scoring import MAX_SEQ_LEN
from offline_rlhf.ledger import read_ledger
from tests.fixtures import REPO_ROOT, reference_model
from tests.integration.test_ppo_stage import cleanup, command, prepare, tokenizer_dir  # noqa: F401 (fixtures)
from tests.synthetic_preferences import FILLER, MODEL
from tests.unit.ppo.tiny_models import STATS, write_skipping_critic

RM_LEN = 30  # the reward model's recorded training length: prompts get 30 - 8 new tokens
LONG = " ".join(FILLER * 6)  # about 60 tokens: beyond RM_LEN, within the policy's 64 - 8


def with_reward_model(run_dir: Path, tokenizer: Path, stats: dict) -> str:
    """A reward model recording RM_LEN as its training length (as `orlhf rm` records it),
    and long prompts; returns the override that serves it."""
    root = run_dir / "rm_short" / "checkpoints"
    save_checkpoint(root, reference_model(MODEL, "value", seed=1),
                    CheckpointMeta(MODEL, "value", TrainState(step=1),
                                   metadata={REWARD_STATS: stats, MAX_SEQ_LEN: RM_LEN}), tokenizer_dir=tokenizer)
    (run_dir / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{i} {LONG}"}) + "\n" for i in range(8)))
    return f"services.reward.checkpoint={root}"


def run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, *overrides), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def strict_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl read as strict JSON: NaN or Infinity is an error."""
    def refuse(constant):
        raise ValueError(f"metrics.jsonl holds {constant}")
    path = run_dir / "ppo" / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line, parse_constant=refuse) for line in lines]


def services_started(run_dir: Path) -> int:
    return sum(row.stage == "ppo_reward" for row in read_ledger(run_dir))


def test_prompts_fit_the_reward_models_length_and_reruns_decide_before_starting_services(
        tmp_path, tokenizer_dir, cleanup):  # noqa: F811 (pytest fixtures)
    run_dir = prepare(tmp_path / "run", tokenizer_dir)
    cleanup(run_dir)
    reward = with_reward_model(run_dir, tokenizer_dir, STATS)
    out = run_dir / "ppo"
    result = run(run_dir, reward, "ppo.iterations=2", "save_every=1")
    assert result.returncode == 0, result.stderr[-3000:]  # was: HTTP 400, 64-token rows for a 30-token model
    assert ("ppo: prompts are limited to 22 tokens: services.reward.checkpoint takes 30 tokens with "
            "generation.max_new_tokens=8; the policy takes 64") in result.stdout
    assert [row["step"] for row in strict_rows(run_dir)] == [1, 2]
    assert services_started(run_dir) == 1

    again = run(run_dir, reward, "ppo.iterations=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"ppo: {out / 'checkpoints' / 'step_00000002'} already holds all 2 iterations; nothing to do" in again.stdout
    done = (out / "DONE").read_text()
    assert services_started(run_dir) == 1 and done.strip().endswith("step_00000002")

    fewer = run(run_dir, reward, "ppo.iterations=1")
    assert fewer.returncode == 2 and services_started(run_dir) == 1
    assert fewer.stderr.strip().splitlines()[-1] == (
        f"orlhf ppo: error: ppo.iterations: 1 is below the 2 iterations that {out / 'checkpoints' / 'step_00000002'} "
        f"already holds; set ppo.iterations=2 to finish with it (or more to continue), or delete {out} to start "
        "this stage over")

    changed = run(run_dir, reward, "ppo.iterations=3", "ppo.kl_coef=0.5")
    assert changed.returncode == 2 and services_started(run_dir) == 1
    assert changed.stderr.strip().endswith(f"restore it, or delete {out} to start this stage over")

    prompts = run_dir / "prompts.jsonl"  # rewritten under the same path: the stream position indexes others
    original = prompts.read_text()
    prompts.write_text("".join(json.dumps({"prompt": f"{i} {LONG} other"}) + "\n" for i in range(8)))  # its end: kept
    rewritten = run(run_dir, reward, "ppo.iterations=3")
    assert rewritten.returncode == 2 and services_started(run_dir) == 1
    refusal = rewritten.stderr.strip().splitlines()[-1]
    assert refusal.startswith(f"orlhf ppo: error: prompts: differs from the run that wrote {out} (1 changed: "
                              "prompts; prompts was ")  # then both digests
    assert refusal.endswith(f"); restore it, or delete {out} to start this stage over")
    prompts.write_text(original)
    # Was: each refused rerun removed DONE, and a pipeline then took the finished stage for unfinished.
    assert (out / "DONE").read_text() == done

    shutil.rmtree(out / "critic" / "checkpoints" / "step_00000002")  # a resume needs the critic's of its iteration
    lost = run(run_dir, reward, "ppo.iterations=3")
    assert lost.returncode == 2 and services_started(run_dir) == 1
    assert lost.stderr.strip().splitlines()[-1] == (
        f"orlhf ppo: error: services.critic: {out / 'critic' / 'checkpoints'} holds no critic checkpoint of "
        f"iteration 2, which resuming from {out / 'checkpoints' / 'step_00000002'} needs; delete {out} to start "
        "this stage over")

    shutil.rmtree(out / "checkpoints")  # starting over without the actor's checkpoints: the critic's old go too
    over = run(run_dir, reward, "ppo.iterations=1", "save_every=1")
    assert over.returncode == 0, over.stderr[-3000:]
    assert f"ppo: no actor checkpoint to resume; removing the critic checkpoints in {out / 'critic' / 'checkpoints'}" \
        in over.stdout
    assert sorted(p.name for p in (out / "critic" / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert [row["step"] for row in strict_rows(run_dir)] == [1]


def test_a_reward_model_with_nan_statistics_fails_the_run_without_done(tmp_path, tokenizer_dir, cleanup):  # noqa: F811
    """Was: every reward NaN, every policy step skipped, DONE on the SFT weights and bare
    NaN in metrics.jsonl."""
    run_dir = prepare(tmp_path / "run", tokenizer_dir)
    cleanup(run_dir)
    reward = with_reward_model(run_dir, tokenizer_dir, {**STATS, "mean": float("nan")})
    result = run(run_dir, reward, "ppo.iterations=2")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "services.reward" in last and "reward" in last.split(":", 2)[-1], result.stderr[-3000:]
    assert not (run_dir / "ppo" / "DONE").exists()
    assert not (run_dir / "ppo" / "checkpoints").exists() and strict_rows(run_dir) == []


def test_a_critic_skipping_its_steps_fails_the_run_without_done_and_its_count_resumes(
        tmp_path, tokenizer_dir, cleanup):  # noqa: F811 (pytest fixtures)
    """Was: every critic step skipped (critic_skipped_steps in each row), and DONE. Two
    iterations of 2 critic steps: the run fails at the second, whose rerun fails again only
    because the first iteration's 2 skipped steps resume from the actor's checkpoint."""
    run_dir = prepare(tmp_path / "run", tokenizer_dir)
    cleanup(run_dir)
    root = run_dir / "critic_skips" / "checkpoints"
    write_skipping_critic(root, tokenizer_dir)
    critic, out = f"services.critic.checkpoint={root}", run_dir / "ppo"
    failed = ("orlhf ppo: error: ppo.max_skipped_fraction: 4 of the 4 critic steps so far (of 4 planned) were "
              "skipped for a non-finite loss or gradient norm, more than 0.5 of the run, so the critic learned "
              "little or nothing; no final checkpoint or DONE was written; lower services.critic.optim.lr or check the "
              "rewards (metrics.jsonl: train/critic_skipped_steps)")
    result = run(run_dir, critic, "ppo.iterations=2", "save_every=1")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == failed, result.stderr[-3000:]
    assert not (out / "DONE").exists()
    assert [row["train/critic_skipped_steps"] for row in strict_rows(run_dir)] == [2, 2]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert read_meta(out / "checkpoints" / "step_00000001").train_state.data_position == {
        "skipped_steps": 0, "critic_skipped_steps": 2}

    again = run(run_dir, critic, "ppo.iterations=2")
    assert "(iteration 1)" in again.stdout, again.stdout[-3000:]
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == failed, again.stderr[-3000:]
    assert not (out / "DONE").exists()
