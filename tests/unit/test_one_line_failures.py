"""Damaged checkpoints, an unwritable run_dir and prompts the gold reward cannot parse fail
with one line through the CLI (hardening issue, item 13), not a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, load_checkpoint, save_checkpoint
from offline_rlhf.cli import main
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.models.llama import Transformer
from tests.fixtures import REPO_ROOT, TINY, reference_model


@pytest.fixture
def ckpt(tmp_path, rm_tokenizer_dir):
    root = tmp_path / "sft" / "checkpoints"
    step = save_checkpoint(root, reference_model(), CheckpointMeta(model=TINY, head="lm", train_state=TrainState(1)),
                           tokenizer_dir=rm_tokenizer_dir)
    return root, step


def _eval(capsys, run_dir, ckpt_root, prompts):
    code = main(["eval", f"run_dir={run_dir}", f"prompts={prompts}", "prompt_key=prompt", "gold=embedded_task", "rm=",
                 f"models=[{{name:sft,checkpoint:{ckpt_root}}}]", "generation.max_new_tokens=4"])
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line(err):
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_truncated_shard_is_a_damaged_checkpoint(ckpt, tmp_path, capsys):
    root, step = ckpt
    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ConfigError, match="checkpoint is damaged"):
        load_checkpoint(step, Transformer(TINY))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "add 3 and 4"}) + "\n")
    code, err = _eval(capsys, tmp_path / "run", root, prompts)
    assert code == 2
    assert str(shard) in _one_line(err) and "damaged" in err and "step_*" in err and "re-run" in err


@pytest.mark.parametrize("content", [b"", b"\x80\x04\x95garbage", None])
def test_truncated_or_corrupt_metadata_is_a_damaged_checkpoint(ckpt, content):
    _, step = ckpt
    metadata = step / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:40] if content is None else content)
    with pytest.raises(ConfigError, match="checkpoint is damaged") as info:
        load_checkpoint(step, Transformer(TINY))
    assert str(metadata) in str(info.value) and "\n" not in str(info.value)


def test_intact_checkpoint_still_loads(ckpt):
    _, step = ckpt
    model = Transformer(TINY)
    load_checkpoint(step, model)
    torch.testing.assert_close(model.state_dict(), reference_model().state_dict())


def test_run_dir_below_a_regular_file_fails_before_any_work(ckpt, tmp_path, capsys):
    """A regular file as the parent makes mkdir fail for root too (root ignores permission bits)."""
    root, _ = ckpt
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = _eval(capsys, blocker / "run", root, tmp_path / "never_read.jsonl")  # the prompts are not read
    assert code == 2
    assert "run_dir" in _one_line(err) and "not writable" in err and str(blocker / "run" / "eval") in err


def test_over_long_prompt_for_the_gold_reward_is_one_line(ckpt, tmp_path, capsys):
    root, _ = ckpt
    prompts = tmp_path / "prompts.jsonl"
    long_prompt = "Please summarise the following article. " * 200
    prompts.write_text(json.dumps({"prompt": "add 3 and 4"}) + "\n" + json.dumps({"prompt": long_prompt}) + "\n")
    code, err = _eval(capsys, tmp_path / "run", root, prompts)
    assert code == 2
    assert f"{prompts}:2" in _one_line(err) and "expected an embedded-task instruction" in err
    assert len(err) < 500 and f"{len(long_prompt.strip())} characters" in err


@pytest.mark.slow
def test_every_rank_fails_cleanly_on_an_unwritable_run_dir(tmp_path):
    """Two processes: rank 0 finds the folder unwritable, rank 1 learns it through the
    collective; both exit 2 and the one line is printed once."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "offline_rlhf.cli", "smoke", "model=tiny", f"run_dir={blocker / 'run'}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "orlhf smoke: error:" in line]
    assert len(lines) == 1 and "not writable" in lines[0], proc.stderr
    assert "offline_rlhf/" not in proc.stderr, proc.stderr  # no traceback through the project (torchrun's own is its)
    assert "exitcode: 2" in proc.stderr


@pytest.mark.slow
def test_a_config_error_every_rank_raises_is_said_under_torchrun(tmp_path):
    """Both ranks fail alike before any collective (no tokenizer for a model from scratch);
    whichever exits first, the line is printed (rank 1 exiting first used to get rank 0
    killed before it printed, and only torchrun's summary was left)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "offline_rlhf.cli", "sft", "model=tiny", f"run_dir={tmp_path / 'run'}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert re.search(r"^orlhf sft: error: (rank 1: )?init.tokenizer", proc.stderr, flags=re.M), proc.stderr


def test_a_rank_other_than_0_waits_for_rank_0_then_says_it(monkeypatch, capsys):
    from offline_rlhf import cli

    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        cli.say_once(f"failed on {rank}")
    assert waits == [cli.OTHER_RANKS_WAIT_S] and capsys.readouterr().err == "failed on 0\nfailed on 1\n"


GLOO_PEER_GONE = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                  "[127.0.0.1]:36273. This is typically caused by a remote worker crashing.")


@pytest.mark.parametrize(("rank", "prefix"), [("0", ""), ("3", "rank 3: ")])
def test_a_collective_failing_because_another_process_died_is_one_line(monkeypatch, capsys, rank, prefix):
    """The survivors of a dead rank printed a traceback through the training loop down to
    gloo's message; the dead rank's own line (or torchrun's summary) has the cause."""
    from offline_rlhf import cli

    def collective_fails(argv):
        raise RuntimeError(GLOO_PEER_GONE + "\nmore detail")

    monkeypatch.setattr(cli, "run", collective_fails)
    monkeypatch.setattr(cli, "_exit_without_teardown", lambda code: None)
    monkeypatch.setattr(cli.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", rank)
    assert cli.main(["sft"]) == 1
    assert capsys.readouterr().err == (f"orlhf sft: error: {prefix}lost contact with another process of the job "
                                       f"({GLOO_PEER_GONE}): one ended first; its own error line or torchrun's "
                                       "summary says which and why\n")


def test_any_other_runtime_error_keeps_its_traceback(monkeypatch):
    from offline_rlhf import cli

    def bug(argv):
        raise RuntimeError(GLOO_PEER_GONE)

    monkeypatch.setattr(cli, "run", bug)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    with pytest.raises(RuntimeError):  # one process: no peer to lose, so this is a bug of its own
        cli.main(["sft"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "_exit_without_teardown", lambda code: None)

    def another_bug(argv):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cli, "run", another_bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["sft"])
