"""`orlhf eval` killed in the middle of a model (a time limit, preemption, Ctrl-C): each
replica's answers are in its shard as they end, and a rerun answers only the prompts no
shard holds (was: every answer of that model again), its outputs byte for byte an
uninterrupted run's, greedy or sampled; the shards go once the model's answers are saved.
Answers to other inputs (decoding, another checkpoint step) are deleted, never resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter

import pytest

import offline_rlhf.stages.eval as eval_stage
from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.cli import main
from tests.fixtures import REPO_ROOT
from tests.integration.test_eval_resume import files, outputs  # noqa: F401 (a fixture)
from tests.integration.test_eval_stage import PLUGIN, STOP, sharp_model
from tests.synthetic_preferences import FILLER, MODEL

PROMPTS = len(FILLER)
SAMPLED = ("generation.greedy=false", "generation.n=2")

# A real kill: the eval CLI with the engine's token callback wrapped so that after KILL_AFTER
# ended answers of model KILL_MODEL on rank KILL_RANK, every process listed in PIDS (its
# world's, as a job's end kills them) and then itself get SIGKILL. Each prompt's answers are
# written as they end (WRITE_EVERY_S 0). COUNT_FILE: a line "rank model requests" per engine run.
HOOK = """
import os, signal, sys
from pathlib import Path
import offline_rlhf.stages.eval as eval_stage
from offline_rlhf.cli import main

rank, env = os.environ.get("RANK", "0"), os.environ
eval_stage.WRITE_EVERY_S = 0.0
if env.get("PIDS"):
    (Path(env["PIDS"]) / rank).write_text(str(os.getpid()))
answer, engine, current = eval_stage.answer_prompts, eval_stage.run, [None]

def answering(model, *args):
    current[0] = model.name
    return answer(model, *args)

def running(policy, requests, *args, on_token=None, **kwargs):
    if env.get("COUNT_FILE"):
        with open(env["COUNT_FILE"], "a") as out:
            out.write(f"{rank} {current[0]} {len(requests)}\\n")
    ended = [0]

    def on_token_(request, completion):
        on_token(request, completion)
        ended[0] += bool(completion.finish)
        if (current[0], rank, str(ended[0])) == (env.get("KILL_MODEL"), env.get("KILL_RANK", "0"),
                                                 env.get("KILL_AFTER")):
            pids = [int(p.read_text()) for p in Path(env["PIDS"]).iterdir()] if env.get("PIDS") else []
            for pid in [p for p in pids if p != os.getpid()] + [os.getpid()]:
                os.kill(pid, signal.SIGKILL)
    return engine(policy, requests, *args, on_token=on_token_, **kwargs)

eval_stage.answer_prompts, eval_stage.run = answering, running
sys.exit(main(sys.argv[1:]))
"""


def eval_args(run_dir, sft, dt, *extra: str) -> list[str]:
    return ["eval", f"run_dir={run_dir}", f"prompts={dt.parent / 'prompts.jsonl'}", "rm=", f"gold={PLUGIN}",
            "generation.max_new_tokens=8", f"generation.stop=[{STOP}]", "bootstrap_samples=50",
            f"models=[{{name: sft, checkpoint: '{sft}'}}, {{name: dt, checkpoint: '{dt}'}}]", *extra]


class Engine:
    """The engine as eval runs it, watched: `requests` holds (model, requests) of each run,
    and `kill` = (model, k) stops the stage (Ctrl-C) once k answers of that model ended."""

    def __init__(self, monkeypatch):
        self.model, self.requests, self.kill = None, [], None
        monkeypatch.setattr(eval_stage, "WRITE_EVERY_S", 0.0, raising=False)  # each prompt's answers as they end
        answer, engine = eval_stage.answer_prompts, eval_stage.run

        def answering(model, *args):
            self.model = model.name
            return answer(model, *args)

        def running(policy, requests, *args, on_token=None, **kwargs):
            self.requests.append((self.model, len(requests)))
            ended = 0

            def on_token_(request, completion):
                nonlocal ended
                on_token(request, completion)
                ended += bool(completion.finish)
                if self.kill == (self.model, ended):
                    raise KeyboardInterrupt
            return engine(policy, requests, *args, on_token=on_token_, **kwargs)
        monkeypatch.setattr(eval_stage, "answer_prompts", answering)
        monkeypatch.setattr(eval_stage, "run", running)


@pytest.fixture
def engine(monkeypatch):
    return Engine(monkeypatch)


def evaluate(run_dir, sft, dt, *extra: str) -> int:
    return main(eval_args(run_dir, sft, dt, *extra))


def in_shards(run_dir, model: str, n: int = 1) -> set[int]:
    """The prompts whose `n` answers the model's shards hold."""
    counts = Counter(json.loads(line)["id"] for path in (run_dir / "eval" / "answering" / model).glob("shard_*.jsonl")
                     for line in path.read_text().splitlines())
    return {prompt for prompt, count in counts.items() if count == n}


def ledger_tokens(run_dir) -> int:
    rows = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return sum(row["tokens"] for row in rows if row["stage"] == "eval")


@pytest.mark.parametrize("extra,n,kill_after", [((), 1, 4), (SAMPLED, 2, 12), ((), 1, PROMPTS)],
                         ids=["greedy", "sampled", "killed-before-the-merge"])
def test_a_model_killed_midway_answers_only_the_rest(files, engine, tmp_path, capsys, extra, n, kill_after):  # noqa: F811
    run_dir = tmp_path / "run"
    engine.kill = ("dt", kill_after)
    assert evaluate(run_dir, files / "sft", files / "dt", *extra) == 130
    done = in_shards(run_dir, "dt", n)
    # n=1: the 4 ended answers; n=2: 12 ended answers of 10 prompts hold both of at least 2
    assert (len(done) == kill_after) if n == 1 else (2 <= len(done) < PROMPTS)
    capsys.readouterr()
    engine.kill, engine.requests = None, []
    assert evaluate(run_dir, files / "sft", files / "dt", *extra) == 0
    left = (PROMPTS - len(done)) * n
    assert engine.requests == ([("dt", left)] if left else [])  # sft's saved answers; dt's from its shards on
    assert f"eval: dt answers {PROMPTS - len(done)} prompts" in capsys.readouterr().out
    assert not (run_dir / "eval" / "answering").exists()  # merged into answered/dt.json, then removed
    assert evaluate(tmp_path / "straight", files / "sft", files / "dt", *extra) == 0
    assert outputs(run_dir) == outputs(tmp_path / "straight")
    # The killed execution's row holds the tokens of the answers it wrote: the rows add up.
    assert ledger_tokens(run_dir) == ledger_tokens(tmp_path / "straight")


def test_a_sigkill_mid_model_and_a_torn_last_write_are_resumed(files, engine, tmp_path, capsys):  # noqa: F811
    """A real SIGKILL after 3 of dt's answers ended (and were written), then a write torn by
    the kill: the rerun cuts the torn line and answers the other 7 prompts."""
    run_dir = tmp_path / "run"
    (hook := tmp_path / "kill.py").write_text(HOOK)
    killed = subprocess.run([sys.executable, str(hook), *eval_args(run_dir, files / "sft", files / "dt")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "KILL_MODEL": "dt", "KILL_AFTER": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(done := in_shards(run_dir, "dt")) == 3
    shard = run_dir / "eval" / "answering" / "dt" / "shard_00000.jsonl"
    torn = json.dumps({"schema": 1, "id": min(set(range(PROMPTS)) - done), "sample": 0, "response": "x"})[:30]
    with open(shard, "a") as out:
        out.write(torn)
    assert evaluate(run_dir, files / "sft", files / "dt") == 0
    assert engine.requests == [("dt", PROMPTS - 3)]
    assert f"cut a torn last line (and an incomplete item's records) from {shard}" in capsys.readouterr().out
    assert evaluate(tmp_path / "straight", files / "sft", files / "dt") == 0
    assert outputs(run_dir) == outputs(tmp_path / "straight")


def test_a_killed_model_s_answers_to_other_inputs_are_not_reused(files, engine, tmp_path, capsys):  # noqa: F811
    run_dir, sft = tmp_path / "run", tmp_path / "sft"
    shutil.copytree(files / "sft", sft)
    engine.kill = ("dt", 4)
    assert evaluate(run_dir, sft, files / "dt") == 130
    engine.kill, engine.requests = None, []
    capsys.readouterr()
    assert evaluate(run_dir, sft, files / "dt", "generation.max_new_tokens=4") == 0  # other decoding
    assert engine.requests == [("sft", PROMPTS), ("dt", PROMPTS)]
    assert (f"eval dt: deleted the unfinished answers in {run_dir / 'eval' / 'answering' / 'dt'}: "
            "generation.max_new_tokens changed since they were written") in capsys.readouterr().out
    assert evaluate(tmp_path / "straight", sft, files / "dt", "generation.max_new_tokens=4") == 0
    assert outputs(run_dir) == outputs(tmp_path / "straight")
    # Killed in sft, whose training then saved a later step (the config still names its root).
    engine.kill, engine.requests = ("sft", 4), []
    assert evaluate(run_dir, sft, files / "dt") == 130
    save_checkpoint(sft, sharp_model(), CheckpointMeta(MODEL, "lm", TrainState(step=5)),
                    tokenizer_dir=files / "tokenizer")
    engine.kill, engine.requests = None, []
    capsys.readouterr()
    assert evaluate(run_dir, sft, files / "dt") == 0
    assert engine.requests == [("sft", PROMPTS), ("dt", PROMPTS)]  # dt: max_new_tokens differs from its saved
    assert "eval sft: deleted the unfinished answers in" in (out := capsys.readouterr().out)
    assert "model_meta_sha256 changed since they were written" in out
    assert evaluate(tmp_path / "straight2", sft, files / "dt") == 0
    assert outputs(run_dir) == outputs(tmp_path / "straight2")


def test_a_ctrl_c_during_a_shard_write_never_writes_those_answers_twice(tmp_path, monkeypatch):
    """Ctrl-C after the write landed but before flush returned: the writer's `finally`
    flushed the same answers again, and the resume refused the shard (a prompt twice)."""
    from types import SimpleNamespace

    from offline_rlhf import fsutil
    from offline_rlhf.generation.shards import kept_records

    def interrupted(path, rows):
        fsutil.append_jsonl_durably(path, rows)
        raise KeyboardInterrupt  # during the fsync, say
    monkeypatch.setattr(eval_stage, "append_jsonl_durably", interrupted)
    monkeypatch.setattr(eval_stage, "WRITE_EVERY_S", 0.0)
    shard = tmp_path / "shard_00000.jsonl"
    writer = eval_stage.ShardWriter([0, 1], [False, False], 1, (lambda ids: "an answer", []), shard, None)
    with pytest.raises(KeyboardInterrupt):
        try:
            writer.on_token(0, SimpleNamespace(finish="stop", tokens=[1, 2]))
        finally:
            writer.flush()  # what the engine run's `finally` does
    assert [record["id"] for record in kept_records(shard, 1, eval_stage.SHARD_SCHEMA)] == [0]
