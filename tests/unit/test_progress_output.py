"""What a user reads during a run: training progress lines show a throughput that means
something, validation lines leave out the losses' internal counters, a frozen PPO service
does not report "0 training steps", and a resume says so once."""

import json

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.config.schema import InitConfig, LoggingConfig
from offline_rlhf.metrics import METRICS_FILE
from offline_rlhf.progress import PREFIX
from offline_rlhf.train.init import initialize_weights
from offline_rlhf.train.metrics_log import MetricsLog
from ppo_baseline.serve import stopped_message
from tests.fixtures import TINY, reference_model


def step_metrics(tokens_per_s: float, seconds: float) -> dict[str, float]:
    return {"loss": 1.0, "lr": 1e-3, "tokens_per_s": tokens_per_s, "step_seconds": seconds}


def rows(stage_dir):
    return [json.loads(line) for line in (stage_dir / METRICS_FILE).read_text().splitlines()]


def test_tok_s_in_a_progress_line_is_the_mean_since_the_last_line(tmp_path, capsys):
    log = MetricsLog(tmp_path, LoggingConfig(progress=True), is_main=True, resumed_step=0, total_steps=4)
    log.train(1, step_metrics(100.0, 1.0), every=1)  # the first update shows a line
    log.train(2, step_metrics(2000.0, 1.0), every=1)  # within PLAIN_EVERY_S: no line
    log.train(3, step_metrics(100.0, 18.0), every=1)
    log.train(4, step_metrics(300.0, 1.0), every=1)  # the last step shows one
    log.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 2
    assert " tok_s=100 " in lines[0]
    assert " tok_s=205 " in lines[1]  # (2000 + 1800 + 300) tokens in 20 s, not step 4's 300
    assert [row["train/tokens_per_s"] for row in rows(tmp_path)] == [100.0, 2000.0, 100.0, 300.0]


def test_a_validation_line_leaves_out_the_internal_counters(tmp_path, capsys):
    log = MetricsLog(tmp_path, LoggingConfig(progress=True), is_main=True, resumed_step=0, total_steps=4)
    log.validation(4, {"loss": 1.5, "count/ess": 48.2278, "count/samples": 50.0, "reward_accuracy": 0.75})
    log.close()
    assert "step 4 validation: loss 1.5000  reward_accuracy 0.7500" in capsys.readouterr().err.splitlines()
    assert rows(tmp_path) == [{"step": 4, "val/loss": 1.5, "val/count/ess": 48.2278, "val/count/samples": 50.0,
                               "val/reward_accuracy": 0.75}]


def test_only_the_critic_reports_training_steps_when_its_service_stops():
    assert stopped_message("reference", 0) == "reference service stopped"
    assert stopped_message("reward", 0) == "reward service stopped"
    assert stopped_message("critic", 12) == "critic service stopped after 12 training steps"
    assert stopped_message("critic", 1) == "critic service stopped after 1 training step"


def test_a_resume_leaves_saying_so_to_the_training_loop(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    save_checkpoint(checkpoints, reference_model(), CheckpointMeta(model=TINY, head="lm", train_state=TrainState()))
    # the loop says `resuming from .../step_... (step N)`; a `weights: resuming from ...` line before it repeated it
    assert initialize_weights(InitConfig(), reference_model(), checkpoints) is None
    assert initialize_weights(InitConfig(), reference_model(), tmp_path / "fresh") == "weights: random initialization"
