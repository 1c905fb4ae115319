"""`orlhf eval` on two data-parallel replicas (torchrun, gloo) killed in the middle of a
model, as a job's end kills every process: each replica's answers are in its shard, the
rerun answers only the prompts neither shard holds, split between the replicas, and gives an
uninterrupted run's outputs; rank 0's bar counts every replica's answers of the whole model
(was: its own replica's share)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.distributed.test_progress_replicas import progress_lines
from tests.fixtures import REPO_ROOT
from tests.integration.test_eval_resume import files, outputs  # noqa: F401 (a fixture)
from tests.integration.test_eval_shards import HOOK, PROMPTS, eval_args, evaluate, in_shards


def torchrun_eval(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    (hook := tmp_path / "kill.py").write_text(HOOK)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(hook), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **env})


def test_two_replicas_killed_mid_model_resume_where_they_stopped(files, tmp_path):  # noqa: F811
    run_dir, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    args = eval_args(run_dir, files / "sft", files / "dt")
    # Rank 0 has written 2 of its 5 prompts' answers (rank 1 0 to 5 of its 5) when both die.
    killed = torchrun_eval(args, tmp_path, KILL_MODEL="dt", KILL_RANK="0", KILL_AFTER="2", PIDS=str(pids))
    assert killed.returncode != 0
    done = in_shards(run_dir, "dt")
    rank0 = (run_dir / "eval" / "answering" / "dt" / "shard_00000.jsonl").read_text().splitlines()
    assert len(rank0) == 2 and 2 <= len(done) < PROMPTS, killed.stderr[-3000:]
    assert (run_dir / "eval" / "answered" / "sft.json").exists()
    counts = tmp_path / "counts.txt"
    resumed = torchrun_eval(args, tmp_path, COUNT_FILE=str(counts))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = [line.split() for line in counts.read_text().splitlines()]
    assert {model for _, model, _ in runs} == {"dt"}  # sft's saved answers are reused
    assert sum(int(requests) for _, _, requests in runs) == PROMPTS - len(done)
    lines = progress_lines(resumed.stderr, "eval dt")  # the whole model's answers, counted from rank 0's shards
    assert lines and {total for _, total in lines} == {PROMPTS} and lines[-1][0] == PROMPTS, resumed.stderr[-3000:]
    assert lines[0][0] >= len(done) and [d for d, _ in lines] == sorted(d for d, _ in lines)
    assert not (run_dir / "eval" / "answering").exists()
    assert evaluate(tmp_path / "straight", files / "sft", files / "dt") == 0  # one process: the same answers
    assert outputs(run_dir) == outputs(tmp_path / "straight")
