"""`train` on a tiny model in this process: a stop signal saves and leaves at the next step
boundary (handlers restored), a longer resumed schedule says how its rate jumps, and a
global batch larger than the data says so."""

import os
import signal
from dataclasses import replace

import pytest
import torch

from offline_rlhf.checkpoint import latest_checkpoint, read_meta
from offline_rlhf.config.errors import ResumeRefused
from offline_rlhf.config.schema import LoggingConfig, OptimConfig, ParallelConfig, TrainConfig
from offline_rlhf.data.batching import collate_sequences
from offline_rlhf.ledger import OneProcess, read_ledger, track
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.stages.sft import sft_task
from offline_rlhf.train import loop
from offline_rlhf.train.loop import STOPPED_EXIT_CODE, CheckpointSpec, StoppedBySignal, Task, TrainData, train
from offline_rlhf.train.schedule import lr_multiplier
from tests.fixtures import TINY, reference_model, runtime_for, sft_sequences

STEPS = TrainConfig(global_batch=4, micro_batch=2, max_steps=6, val_every=0, save_every=100, keep_last=5)
COSINE = OptimConfig(lr=1e-3, warmup_steps=1, schedule="cosine")


def run(tmp_path, cfg=STEPS, task=None, items=8, model=None):
    """`train` as a stage runs it; returns the model and the loop's result."""
    model = model or reference_model()
    data = TrainData(sft_sequences(items), [], lambda chunk: collate_sequences(chunk, pad_id=0), seq_len=24)
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, TINY), None, stage_dir=tmp_path / "sft")
    rt.stage_dir.mkdir(parents=True, exist_ok=True)
    with track(tmp_path, "sft", OneProcess(), "cpu") as usage:
        result = train(task or sft_task(True), model, data, cfg, COSINE, LoggingConfig(progress=False), rt, usage,
                       CheckpointSpec(root=rt.stage_dir / "checkpoints", model=TINY, head="lm"))
    return model, result


def signalling_task(at_call: int, sig: signal.Signals) -> Task:
    """The SFT task, sending this process `sig` during its `at_call`-th micro-batch."""
    sft, calls = sft_task(True), []

    def loss(model, batch, normalizer):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), sig)
        return sft.loss(model, batch, normalizer)

    return replace(sft, loss=loss)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_the_step_it_reached_and_exits_with_the_status(tmp_path, capsys, sig):
    received = []
    previous = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        with pytest.raises(StoppedBySignal) as stop:  # the 3rd micro-batch is in step 2 (2 per step)
            run(tmp_path, task=signalling_task(3, sig))
        assert stop.value.code == STOPPED_EXIT_CODE == 75 and stop.value.step == 2
        assert received == []  # the loop's handler took it ...
        os.kill(os.getpid(), sig)
        assert received == [sig]  # ... and the caller's is back
    finally:
        signal.signal(sig, previous)
    checkpoints = tmp_path / "sft" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step_00000002" == stop.value.checkpoint.name
    assert read_meta(latest_checkpoint(checkpoints)).has_optimizer  # resumable, not just weights
    assert not (tmp_path / "sft" / "DONE").exists()
    out = capsys.readouterr().out
    assert (f"sft: stopped by a signal (SIGTERM/SIGUSR1/Ctrl-C) after saving step 2 of 6 to {stop.value.checkpoint}; "
            "exit status 75: rerun the same command to resume from it") in out


def test_a_second_ctrl_c_interrupts_without_waiting_for_the_save(tmp_path):
    twice = signalling_task(3, signal.SIGINT)
    sft, calls = sft_task(True), []

    def loss(model, batch, normalizer):  # Ctrl-C at the 3rd micro-batch (in `twice`), again at the 4th
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return twice.loss(model, batch, normalizer)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, not a background job
    try:
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, task=replace(sft, loss=loss))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert latest_checkpoint(tmp_path / "sft" / "checkpoints") is None  # interrupted before step 2's save


def test_a_ctrl_c_ignored_from_the_start_stays_ignored(tmp_path):
    """A shell's background job starts with SIGINT ignored: training does not take it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _, result = run(tmp_path, task=signalling_task(3, signal.SIGINT))
        assert result.checkpoint.name == "step_00000006" and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_resumed_run_ends_with_the_uninterrupted_runs_weights(tmp_path):
    with pytest.raises(StoppedBySignal):
        run(tmp_path / "stopped", task=signalling_task(5, signal.SIGUSR1))
    resumed, result = run(tmp_path / "stopped", model=reference_model(seed=7))  # the checkpoint's weights win
    straight, _ = run(tmp_path / "straight")
    assert result.steps == 6 and result.checkpoint.name == "step_00000006"
    for (name, tensor), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(tensor, other), name
    # The ledger charges the stopped execution with the one that resumed its checkpoint.
    assert [(r.status, r.resumed) for r in read_ledger(tmp_path / "stopped")] == [("interrupted", False),
                                                                                  ("completed", True)]
    assert [(r.status, r.resumed) for r in read_ledger(tmp_path / "straight")] == [("completed", False)]


def test_a_longer_resumed_schedule_says_how_the_rate_jumps(tmp_path, capsys):
    run(tmp_path, replace(STEPS, max_steps=4))
    capsys.readouterr()
    run(tmp_path, replace(STEPS, max_steps=8))
    before, after = (COSINE.lr * lr_multiplier(4, total, COSINE) for total in (4, 8))
    assert f"{before:.2e}" == "1.00e-04" and f"{after:.2e}" == "6.50e-04"  # min_lr_ratio 0.1, then mid-cosine
    assert ("the learning-rate schedule now spans 8 steps (train.max_steps or train.epochs changed since step 4 "
            "was saved): the rate of step 5 jumps from 1.00e-04 to 6.50e-04") in capsys.readouterr().out
    run(tmp_path, replace(STEPS, max_steps=10))  # resumes at 8, the end of the 8-step schedule
    run(tmp_path, replace(STEPS, max_steps=10))  # finished: the same schedule, nothing to say
    assert capsys.readouterr().out.count("the learning-rate schedule now spans") == 1


def test_a_global_batch_larger_than_the_data_is_named_once(tmp_path, capsys):
    run(tmp_path, replace(STEPS, global_batch=16, max_steps=-1), items=3)
    out = capsys.readouterr().out
    assert out.count("warning:") == 1
    assert ("warning: train.global_batch=16 is larger than the 3 training items, so every step holds items more "
            "than once (each about 5.3 times); set train.global_batch to at most 2 (a multiple of "
            "train.micro_batch x data-parallel size = 2)") in out
    assert "training: 3 items, 1 steps of 16" in out
    run(tmp_path / "enough", replace(STEPS, max_steps=2), items=4)
    assert "warning" not in capsys.readouterr().out


def test_the_training_line_comes_before_the_progress_bar(tmp_path, capsys, monkeypatch):
    """On a terminal the bar's first frame (drawn when it is created) shared a row with the
    `training: ...` line printed after it."""
    printed_before_the_bar, made = [], loop.MetricsLog

    def metrics_log(*args, **kwargs):
        printed_before_the_bar.append(capsys.readouterr().out)
        return made(*args, **kwargs)

    monkeypatch.setattr(loop, "MetricsLog", metrics_log)
    run(tmp_path, replace(STEPS, max_steps=2))
    assert "training: 8 items, 2 steps of 4 " in printed_before_the_bar[0]


def test_one_micro_batch_per_rank_is_singular(tmp_path, capsys):
    run(tmp_path, replace(STEPS, global_batch=2, max_steps=1))
    assert "training: 8 items, 1 steps of 2 (1 micro-batch of 2 per rank), starting at step 0" in \
        capsys.readouterr().out
    run(tmp_path / "two", replace(STEPS, max_steps=1))
    assert "(2 micro-batches of 2 per rank)" in capsys.readouterr().out


def test_a_schedule_shortened_to_the_checkpoint_finishes_it_and_one_behind_it_is_refused(tmp_path):
    """Was: a rerun with train.max_steps at or below a stopped run's step wrote DONE on that
    intermediate checkpoint, without the final validation and metadata (an RM's reward
    statistics, a DT's target), which later stages then lacked."""
    with pytest.raises(StoppedBySignal):  # step 2 of 6 saved as an intermediate step
        run(tmp_path, task=signalling_task(3, signal.SIGUSR1))
    checkpoints = tmp_path / "sft" / "checkpoints"
    assert "final" not in read_meta(latest_checkpoint(checkpoints)).metadata
    with pytest.raises(ResumeRefused, match=r"^train.max_steps: the run now ends at step 1, before the 2 steps .* "
                                            r"already holds; set train.max_steps=2 \(or more"):
        run(tmp_path, cfg=replace(STEPS, max_steps=1))
    _, result = run(tmp_path, cfg=replace(STEPS, max_steps=2, val_every=1), items=8)
    meta = read_meta(latest_checkpoint(checkpoints))
    assert result.checkpoint.name == "step_00000002" and meta.metadata["final"] is True
    assert result.last_val == {}  # no validation items here; the final save ran all the same


def test_a_run_that_ends_inside_its_warmup_says_so(tmp_path, capsys):
    """It trains below optim.lr throughout: fine for a test run of a few steps, a waste if
    warmup_steps is a typo (1000 for 10); a note, not a refusal."""
    assert OptimConfig(warmup_steps=3).warmup_note(4) is None
    assert OptimConfig(warmup_steps=1000).warmup_note(3, "services.critic.") == (
        "note: services.critic.optim.warmup_steps=1000 is not below the run's 3 optimizer steps: it trains below "
        "services.critic.optim.lr throughout")
    run(tmp_path, replace(STEPS, max_steps=1))  # COSINE warms up for 1 step
    assert "note: optim.warmup_steps=1 is not below the run's 1 optimizer steps" in capsys.readouterr().out
