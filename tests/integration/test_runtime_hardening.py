"""What every stage gets from `stage_runtime`, through the CLI: one run of a stage at a
time (a killed run's lock is taken over), no `DONE` left beside a rerun in progress, a
ledger row that covers start-up and survives SIGKILL, sequence lengths checked against
the model a checkpoint fixes, and a log line for a checkpoint from outside the run."""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
import torch

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, latest_checkpoint, save_checkpoint
from offline_rlhf.cli import main
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ModelConfig
from offline_rlhf.generation.shards import merge_shards
from offline_rlhf.host import LOCK
from offline_rlhf.ledger import read_ledger
from offline_rlhf.models.llama import Transformer
from tests.fixtures import REPO_ROOT

pytestmark = pytest.mark.slow

# Runs `orlhf mix`, holding it inside the stage for HOLD_SECONDS (after touching
# STARTED_FLAG), then SIGKILLs it when KILL is set; beats every 0.5 s to keep the test short.
SLOW_MIX = """
import os, signal, sys, time
import offline_rlhf.ledger as ledger
import offline_rlhf.stages.mix as stage
from offline_rlhf.cli import main

ledger.BEAT_SECONDS = 0.5
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background CI job ignores it)
original = stage.draw
def slow_draw(*args):
    open(os.environ["STARTED_FLAG"], "w").close()
    time.sleep(float(os.environ["HOLD_SECONDS"]))
    if os.environ.get("KILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args)
stage.draw = slow_draw
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """A small `orlhf label` output: generated, sft and preference-pair records."""
    path = tmp_path_factory.mktemp("labeled") / "labeled.jsonl"
    rows = [{"prompt": f"p{i}", "response": f"r{i}", "kind": kind, "source": kind, "reward": float(i % 5)}
            for kind in ("generated", "sft") for i in range(12)]
    rows += [{"prompt": f"q{i}", "response": f"{side}{i}", "kind": side, "source": "pairs", "pair": i,
              "reward": float(side == "chosen")} for i in range(6) for side in ("chosen", "rejected")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def mix_args(run_dir, labeled, *extra):
    return ["mix", f"run_dir={run_dir}", f"input={labeled}", *extra]


def start_slow_mix(args, flag, hold: float, kill: bool = False) -> subprocess.Popen:
    env = {**os.environ, "STARTED_FLAG": str(flag), "HOLD_SECONDS": str(hold), "KILL": "1" if kill else "",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_MIX, *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(flag, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not flag.exists():
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "the stage never started"
        time.sleep(0.05)


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_a_second_run_of_a_stage_refuses_and_a_killed_run_is_taken_over(labeled, tmp_path, capsys):
    run_dir, flag = tmp_path / "run", tmp_path / "started"
    first = start_slow_mix(mix_args(run_dir, labeled), flag, hold=600, kill=False)
    try:
        wait_for(flag, first)
        assert main(mix_args(run_dir, labeled)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("orlhf mix: error: run_dir: ") and "\n" not in err
        assert f"already running as pid {first.pid} on " in err and "wait for it to end" in err
        assert not (run_dir / "mix" / "DONE").exists()
    finally:
        first.kill()
        first.wait()
    assert (run_dir / "mix" / LOCK).exists()  # a SIGKILL leaves its lock behind
    assert main(mix_args(run_dir, labeled)) == 0
    assert f"took over the lock of pid {first.pid}" in capsys.readouterr().out
    assert (run_dir / "mix" / "DONE").exists() and not (run_dir / "mix" / LOCK).exists()
    # One row per execution: the refused run wrote none, the killed one is 'interrupted'.
    assert [row.status for row in read_ledger(run_dir)] == ["interrupted", "completed"]


def test_a_rerun_in_progress_has_no_done_beside_its_new_config(labeled, tmp_path):
    run_dir, flag = tmp_path / "run", tmp_path / "started"
    assert main(mix_args(run_dir, labeled)) == 0
    assert (run_dir / "mix" / "DONE").exists()
    rerun = start_slow_mix(mix_args(run_dir, labeled, "seed=7"), flag, hold=600, kill=False)
    try:
        wait_for(flag, rerun)
        assert "seed: 7" in (run_dir / "mix" / "config.yaml").read_text()
        assert not (run_dir / "mix" / "DONE").exists()
    finally:
        rerun.kill()
        rerun.wait()
    assert not (run_dir / "mix" / "DONE").exists()


def test_a_killed_stage_is_charged_the_seconds_it_ran_start_up_included(labeled, tmp_path):
    run_dir, flag = tmp_path / "run", tmp_path / "started"
    spawned = time.time()
    killed = start_slow_mix(mix_args(run_dir, labeled), flag, hold=3.0, kill=True)
    killed.communicate()
    ran = time.time() - spawned
    assert killed.returncode == -9
    assert main(mix_args(run_dir, labeled)) == 0  # turns the heartbeat into an 'interrupted' row
    row = read_ledger(run_dir)[0]
    assert row.status == "interrupted"
    assert epoch(row.start) - spawned < 0.5  # from the process's creation, before torch was imported
    assert row.wall_seconds >= ran - 1.5, (row.wall_seconds, ran)  # at most one beat (0.5 s) lost


def test_ctrl_c_is_one_line_and_an_interrupted_row(labeled, tmp_path):
    """Was: a KeyboardInterrupt traceback and a `failed` ledger row (left uncharged even when
    a rerun resumed the work)."""
    run_dir, flag = tmp_path / "run", tmp_path / "started"
    stage = start_slow_mix(mix_args(run_dir, labeled), flag, hold=30.0)
    wait_for(flag, stage)
    stage.send_signal(signal.SIGINT)
    _, err = stage.communicate(timeout=60)
    assert stage.returncode == 130
    assert err.decode().strip().splitlines()[-1] == \
        "orlhf mix: interrupted (Ctrl-C); nothing was kept: rerun the same command to start it over"
    assert [row.status for row in read_ledger(run_dir)] == ["interrupted"]


def test_a_short_stage_row_covers_its_start_up(labeled, tmp_path):
    run_dir = tmp_path / "run"
    spawned = time.time()
    result = subprocess.run([sys.executable, "-m", "offline_rlhf.cli", *mix_args(run_dir, labeled)], cwd=REPO_ROOT,
                            capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ran = time.time() - spawned
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    [row] = read_ledger(run_dir)
    assert epoch(row.start) - spawned < 0.5  # from process creation, not from when the stage began
    assert epoch(row.end) >= (run_dir / "mix" / "DONE").stat().st_mtime  # to the stage's last write
    assert row.wall_seconds <= ran


def test_shards_written_twice_name_the_way_out(tmp_path):
    record = {"schema": 1, "id": 0, "prompt": "p", "response": "r"}
    for replica in (0, 1):  # two runs at once both answered prompt 0
        (tmp_path / f"shard_{replica:05d}.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: prompt 0 \(sample 0\) was answered twice .*; delete "
                                          r".*shard_\*\.jsonl and rerun the stage"):
        merge_shards(tmp_path, 1)
    (tmp_path / "shard_00001.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"missing .*; rerun the stage to do them"):
        merge_shards(tmp_path, 2)


def test_a_broken_latest_pointer_names_the_way_out(tmp_path):
    (tmp_path / "latest").write_text("step_00000007\n")
    with pytest.raises(ConfigError, match="write the name of a complete step_\\* folder into it, or delete"):
        latest_checkpoint(tmp_path)


SHORT_MODEL = ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


@pytest.fixture(scope="module")
def short_checkpoint(tmp_path_factory):
    """An embedded task in `run/task/` and, outside `run/`, an LM checkpoint whose model
    allows 32 tokens (the configured `model=tiny` allows 512)."""
    root = tmp_path_factory.mktemp("short")
    assert main(["task", f"run_dir={root / 'run'}", "n_sft=40", "n_preferences=10", "n_gen_prompts=10",
                 "n_eval_prompts=10"]) == 0
    torch.manual_seed(0)
    model = Transformer(SHORT_MODEL, head="lm")
    model.init_weights()
    save_checkpoint(root / "ckpt", model, CheckpointMeta(model=SHORT_MODEL, head="lm", train_state=TrainState()),
                    tokenizer_dir=root / "run" / "task" / "tokenizer")
    return root


def sft_from(root, *extra):
    return ["sft", f"run_dir={root / 'run'}", "data=embedded_task_sft", f"init.checkpoint={root / 'ckpt'}",
            "train.global_batch=4", "train.micro_batch=4", "train.max_steps=1", "train.val_every=0",
            "logging.progress=false", *extra]


def test_sequence_length_is_checked_against_the_checkpoints_model(short_checkpoint, capsys):
    assert main(sft_from(short_checkpoint, "data.max_seq_len=64")) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("orlhf sft: error: data.max_seq_len: 64 exceeds max_seq_len=32 of the init.checkpoint's model; "
                   "set data.max_seq_len<=32")
    assert not (short_checkpoint / "run" / "sft").exists()  # refused before the stage started


def test_config_records_the_model_run_and_a_foreign_checkpoint_is_logged(short_checkpoint, capsys):
    assert main(sft_from(short_checkpoint, "data.max_seq_len=32")) == 0
    out = capsys.readouterr().out
    assert f"loading {short_checkpoint / 'ckpt'}" in out and "a checkpoint from outside this run" in out
    text = (short_checkpoint / "run" / "sft" / "config.yaml").read_text()
    recorded = text[text.index("# init.checkpoint fixes the architecture"):]
    assert "#     max_seq_len: 32" in recorded and "#     dim: 32" in recorded
    # The composed part is unchanged, so a pipeline rerun still recognizes the stage as done.
    assert "max_seq_len: 512" in text[:text.index("# init.checkpoint")]
