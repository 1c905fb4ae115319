"""Rank 0's progress with two data-parallel replicas (torchrun worlds, gloo): generate's and
reference's bars count every replica's work to the whole stage's total (was: rank 0's share,
"100%" while the other replica still worked); so does eval's answer bar, from the replicas'
shards (was: rank 0's share, named as such); eval's reward-model scoring shows progress
over every rank's answers (was: nothing)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from offline_rlhf.progress import PREFIX
from tests.distributed.test_long_waits_parallel import generate_inputs, torchrun_generate  # noqa: F401 (a fixture)
from tests.fixtures import REPO_ROOT
from tests.integration.test_dpo_reference import lm_run, pairs_of, reference_args  # noqa: F401 (a fixture)

# Scoring a few pairs or answers takes less than quiet_progress's delay: show it at once.
SHOW_AT_ONCE = """
import sys
import offline_rlhf.progress as progress
from offline_rlhf.cli import main
progress.QUIET_FOR_S = 0.0
sys.exit(main(sys.argv[1:]))
"""


def torchrun_at_once(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    (hook := tmp_path / "show_at_once.py").write_text(SHOW_AT_ONCE)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(hook), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def progress_lines(stderr: str, desc: str) -> list[tuple[int, int]]:
    """(done, total) of each plain progress line of `desc`."""
    return [(int(done), int(total)) for done, total in
            re.findall(rf"^{re.escape(PREFIX + desc)}: \w+ (\d+)/(\d+)", stderr, flags=re.M)]


def test_generate_progress_counts_every_replica_s_answers(generate_inputs, tmp_path):  # noqa: F811
    """16 prompts, 8 per replica: rank 0's bar goes to 16 of 16, not to its own 8 of 8."""
    result = torchrun_generate(generate_inputs, tmp_path / "run", str(generate_inputs / "prompts_0.jsonl"),
                               {"SLOW_S": "3"})  # replica 1 ends after replica 0: its answers come from its shard
    assert result.returncode == 0, result.stderr[-3000:]
    lines = progress_lines(result.stderr, "generate")
    assert lines and {total for _, total in lines} == {16}, result.stderr[-3000:]
    assert lines[-1][0] == 16 and [done for done, _ in lines] == sorted(done for done, _ in lines)


def test_reference_progress_counts_every_replica_s_pairs(lm_run, tmp_path):  # noqa: F811
    """Was: no progress at all while the pairs were scored."""
    result = torchrun_at_once(reference_args(lm_run, tmp_path / "two", "parallel.dp=2"), tmp_path)
    stderr = result.stderr
    assert result.returncode == 0, stderr[-3000:]
    pairs = len(pairs_of(tmp_path / "two"))
    lines = progress_lines(stderr, "reference")
    assert lines and {total for _, total in lines} == {pairs} and lines[-1][0] == pairs, stderr[-3000:]


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    from tests.synthetic_preferences import FILLER, synthetic_tokenizer
    from tests.unit.ppo.tiny_models import write_checkpoints

    root = tmp_path_factory.mktemp("eval_progress")
    synthetic_tokenizer(root / "tokenizer")
    write_checkpoints(root, root / "tokenizer")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n"
                                                for w in FILLER[:8]))
    return root


def test_eval_progress_counts_every_replica_s_answers_and_reward_model_scoring_every_answer(eval_files, tmp_path):
    args = ["eval", f"run_dir={tmp_path / 'run'}", f"prompts={eval_files / 'prompts.jsonl'}", "prompt_key=prompt",
            f"rm={eval_files / 'rm' / 'checkpoints'}", "generation.max_new_tokens=4", "generation.n=2",
            "generation.greedy=false", "bootstrap_samples=10", "batch_size=3",
            f"models=[{{name: sft, checkpoint: '{eval_files / 'sft' / 'checkpoints'}'}}]"]
    result = torchrun_at_once(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answered = progress_lines(result.stderr, "eval sft")
    assert answered and {total for _, total in answered} == {16}, result.stderr[-3000:]  # 8 prompts x 2 samples
    assert answered[-1] == (16, 16) and "replica 0's share" not in result.stderr  # both replicas', from the shards
    scored = progress_lines(result.stderr, "eval rm sft")
    assert scored and scored[-1] == (16, 16), result.stderr[-3000:]  # every rank's: 8 prompts x 2 samples
