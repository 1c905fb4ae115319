"""`orlhf sft` end to end on real public data, and exact resumption after SIGKILL."""

import json
import shutil
import subprocess
import sys

import torch

from offline_rlhf.checkpoint import latest_checkpoint, load_checkpoint, read_meta
from offline_rlhf.cli import main
from offline_rlhf.ledger import read_ledger
from offline_rlhf.metrics import read_metrics
from offline_rlhf.models.llama import Transformer
from tests.fixtures import REPO_ROOT
from tests.local_data import SFT_DATA


def sft_args(run_dir, tokenizer, *extra):
    return ["sft", f"run_dir={run_dir}", f"init.tokenizer={tokenizer}", "data.max_seq_len=128",
            SFT_DATA,
            "train.global_batch=8", "train.micro_batch=4", "optim.lr=3e-3", "optim.warmup_steps=2",
            "logging.progress=false", *extra]


def test_sft_end_to_end_validation_loss_falls(tmp_path, public_tokenizer):
    run_dir = tmp_path / "run"
    assert main(sft_args(run_dir, public_tokenizer, "train.max_steps=16", "train.val_every=8",
                         "train.save_every=8")) == 0
    stage = run_dir / "sft"
    val = [row["val/loss"] for row in read_metrics(stage) if "val/loss" in row]
    # ln(512) = 6.24 is the loss of a uniform guess; it keeps falling between the two checks.
    assert len(val) == 2 and val[0] < 6.0 and val[1] < val[0] - 0.1, val
    train_rows = [row for row in read_metrics(stage) if "train/loss" in row]
    assert [row["step"] for row in train_rows] == list(range(1, 17))
    assert all(row["train/tokens_per_s"] > 0 and 0 <= row["train/data_share"] < 1 for row in train_rows)
    assert (stage / "config.yaml").read_text().count("global_batch: 8") == 1
    card = json.loads((stage / "dataset_card.json").read_text())
    assert card["totals"]["taken"] == 142 + 175 and card["totals"]["truncated"] > 0
    assert card["train"]["documents"] + card["val"]["documents"] == 317
    ckpt = latest_checkpoint(stage / "checkpoints")
    meta = read_meta(ckpt)
    assert ckpt.name == "step_00000016" and meta.train_state.step == 16 and meta.has_optimizer
    assert (ckpt / "tokenizer" / "tokenizer.json").exists()
    assert meta.metadata["template"] == {"kind": "paper", "user_tag": "User:", "assistant_tag": "Assistant:",
                                         "sep": " "}
    [row] = read_ledger(run_dir)
    assert row.stage == "sft" and row.status == "completed" and row.tokens == meta.train_state.tokens_seen > 0
    assert row.device_hours > 0 and row.devices == 1


def test_rerun_continues_only_the_same_experiment(tmp_path, public_tokenizer, capsys):
    run_dir = tmp_path / "run"
    args = sft_args(run_dir, public_tokenizer, "train.max_steps=4", "train.save_every=4")
    assert main(args) == 0
    assert main(args) == 0  # finished already: no step runs, DONE still names the checkpoint
    assert (run_dir / "sft" / "DONE").read_text().strip().endswith("step_00000004")
    finished = {name: (run_dir / "sft" / name).read_text() for name in ("DONE", "config.yaml")}
    assert main([*args, "optim.lr=1e-4"]) == 2
    assert "optim.lr: differs from the run that wrote" in capsys.readouterr().err
    # Refused before writing anything: the finished stage stands as it was (a pipeline skips it).
    assert {name: (run_dir / "sft" / name).read_text() for name in finished} == finished
    assert main([*args[:-2], "train.max_steps=6", "train.save_every=4", "logging.progress=true"]) == 0
    assert latest_checkpoint(run_dir / "sft" / "checkpoints").name == "step_00000006"  # longer runs may resume


def test_a_run_folder_moved_elsewhere_resumes(tmp_path, public_tokenizer):
    """Paths inside the run (here its tokenizer, as a pipeline's ${run_dir}/task/tokenizer)
    are compared relative to it: a run moved from scratch to project storage continues."""
    scratch, storage = tmp_path / "scratch" / "run", tmp_path / "storage" / "run"
    shutil.copytree(public_tokenizer, scratch / "tokenizer")
    assert main(sft_args(scratch, scratch / "tokenizer", "train.max_steps=4", "train.save_every=4")) == 0
    storage.parent.mkdir()
    scratch.rename(storage)
    assert main(sft_args(storage, storage / "tokenizer", "train.max_steps=6", "train.save_every=4")) == 0
    assert latest_checkpoint(storage / "sft" / "checkpoints").name == "step_00000006"
    assert main(sft_args(storage, public_tokenizer, "train.max_steps=8")) == 2  # another tokenizer is not


KILL_AFTER_SAVE = """
import os, signal, sys
import offline_rlhf.train.loop as loop
from offline_rlhf.cli import main

original_save = loop._save
def save_then_die(ckpt, model, optimizer, scheduler, state, *rest):
    path = original_save(ckpt, model, optimizer, scheduler, state, *rest)
    if state.step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return path
loop._save = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def _final_weights(run_dir):
    model = Transformer(read_meta(latest_checkpoint(run_dir / "sft" / "checkpoints")).model)
    load_checkpoint(latest_checkpoint(run_dir / "sft" / "checkpoints"), model)
    return model.state_dict()


def test_sigkilled_run_resumes_to_identical_weights(tmp_path, public_tokenizer):
    steps = ["train.max_steps=6", "train.save_every=2", "train.val_every=0", "train.keep_last=5"]
    killed = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", KILL_AFTER_SAVE, *sft_args(killed, public_tokenizer, *steps)],
                            cwd=REPO_ROOT, env={**__import__("os").environ, "KILL_AT_STEP": "4"}, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert latest_checkpoint(killed / "sft" / "checkpoints").name == "step_00000004"
    assert main(sft_args(killed, public_tokenizer, *steps)) == 0  # resumes at step 4

    uninterrupted = tmp_path / "straight"
    assert main(sft_args(uninterrupted, public_tokenizer, *steps)) == 0
    resumed, straight = _final_weights(killed), _final_weights(uninterrupted)
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name
    rows = read_ledger(killed)
    assert [r.status for r in rows] == ["interrupted", "completed"]
    # The killed run's row ends at its last heartbeat, taken at least at every checkpoint.
    at_step_2 = read_meta(killed / "sft" / "checkpoints" / "step_00000002").train_state.tokens_seen
    assert rows[0].tokens >= at_step_2 > 0 and rows[0].device_hours > 0
    logged = [row["step"] for row in read_metrics(killed / "sft") if "train/loss" in row]
    assert logged == list(range(1, 7))  # no step logged twice after the resume


def test_sigterm_saves_the_step_reached_and_the_rerun_resumes_to_identical_weights(tmp_path, public_tokenizer):
    """SIGTERM (scancel, preemption; Slurm's warning before a time limit, SIGUSR1, is handled
    alike): the loop saves at the next step boundary and exits 75, writing nothing else."""
    import re
    import signal
    import time

    steps = ["train.max_steps=16", "train.save_every=100", "train.val_every=0", "train.keep_last=5"]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "offline_rlhf.cli", *sft_args(stopped, public_tokenizer, *steps)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = stopped / "sft" / "metrics.jsonl", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and \
            not (metrics.exists() and metrics.read_text().count("train/loss") >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # mid-run: step 2 is logged, 14 more to go
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    reached = int(re.search(r"stopped by a signal \(SIGTERM/SIGUSR1/Ctrl-C\) after saving step (\d+) of 16 to "
                            r"\S+; exit status 75: rerun the same command to resume from it", out).group(1))
    assert 2 <= reached < 16
    assert latest_checkpoint(stopped / "sft" / "checkpoints").name == f"step_{reached:08d}"
    assert sorted(p.name for p in (stopped / "sft" / "checkpoints").glob("step_*")) == [f"step_{reached:08d}"]
    assert not (stopped / "sft" / "DONE").exists()
    assert [row["step"] for row in read_metrics(stopped / "sft") if "train/loss" in row] == list(range(1, reached + 1))

    assert main(sft_args(stopped, public_tokenizer, *steps)) == 0  # resumes at the step it reached
    uninterrupted = tmp_path / "straight"
    assert main(sft_args(uninterrupted, public_tokenizer, *steps)) == 0
    resumed, straight = _final_weights(stopped), _final_weights(uninterrupted)
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name
    assert [row["step"] for row in read_metrics(stopped / "sft") if "train/loss" in row] == list(range(1, 17))
    # The stopped execution was resumed: the report charges it (a failed one would be left out).
    assert [row.status for row in read_ledger(stopped)] == ["interrupted", "completed"]


def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, public_tokenizer):
    """Two ranks under torchrun; only rank 1 is signalled (Slurm's signals reach the ranks at
    slightly different times): the per-step MAX makes both save the same step together."""
    import os
    import re
    import signal
    import time
    from pathlib import Path

    run_dir, steps = tmp_path / "run", ["train.max_steps=16", "train.save_every=100", "train.val_every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "offline_rlhf.cli", *sft_args(run_dir, public_tokenizer, *steps)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run_dir / "sft" / "metrics.jsonl", time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline and \
            not (metrics.exists() and metrics.read_text().count("train/loss") >= 2):
        time.sleep(0.02)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    [rank_1] = [pid for pid in workers if b"\0RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
    os.kill(int(rank_1), signal.SIGUSR1)  # mid-run: step 2 of 16 is logged
    try:
        out, err = proc.communicate(timeout=180)  # ranks that disagreed would hang in mismatched collectives
    finally:
        for pid in [proc.pid, *map(int, workers)] if proc.poll() is None else []:
            os.kill(pid, signal.SIGKILL)  # torchrun's workers run in sessions of their own
    # Rank 0, never signalled, says it stopped: it learned of rank 1's signal at the same step.
    reached = int(re.search(r"after saving step (\d+) of 16 to", out).group(1))
    assert 2 <= reached < 16, out
    # torchrun's summary: the first rank to leave (after the save, which ends in a barrier) exited
    # with the status; the other did too, or was still tearing down when torchrun, seeing the
    # first gone, sent it SIGTERM.
    exits = dict(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (-?\d+)", err))
    assert set(exits) == {"0", "1"} and "75" in exits.values() and set(exits.values()) <= {"75", "-15"}, err[-3000:]
    ckpt = latest_checkpoint(run_dir / "sft" / "checkpoints")
    assert ckpt.name == f"step_{reached:08d}" and read_meta(ckpt).world_size == 2
