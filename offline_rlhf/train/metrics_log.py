"""What a user sees during training: a progress bar on rank 0, `metrics.jsonl` in the stage
directory, and optionally TensorBoard or Weights & Biases."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from offline_rlhf.config.schema import LoggingConfig, ModelConfig
from offline_rlhf.fsutil import atomic_file, write_atomic
from offline_rlhf.metrics import METRICS_FILE, is_blank, mfu, numbered_rows
from offline_rlhf.progress import Progress
from offline_rlhf.runtime import Runtime


def throughput_metrics(tokens: int, step_seconds: float, data_seconds: float, model: ModelConfig, head: str,
                       seq_len: int, rt: Runtime) -> dict[str, float]:
    """tokens: processed by the whole job in this step."""
    tokens_per_s = tokens / step_seconds
    metrics = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / rt.dims.world_size,
               "step_seconds": step_seconds, "data_share": data_seconds / step_seconds}
    if rt.device.type == "cuda":
        utilization = mfu(tokens_per_s / rt.dims.world_size, model, seq_len, rt.device, head)
        if utilization is not None:
            metrics["mfu"] = utilization
        metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
    return metrics


COUNT = "count/"  # a loss's internal counters (offline_rlhf.train.loop.COUNT)
# What a step's tokens_per_s is measured over: the training step (train loop), the
# generation (PPO); without either, the steps' rates weigh alike.
RATE_SECONDS = ("step_seconds", "time_generate")


class MetricsLog:
    def __init__(self, stage_dir: Path, cfg: LoggingConfig, is_main: bool, resumed_step: int, total_steps: int):
        self.path = Path(stage_dir) / METRICS_FILE
        self.is_main = is_main
        self.bar = Progress(Path(stage_dir).name, total_steps, resumed_step, enabled=is_main and cfg.progress)
        self.window = (0.0, 0.0)  # tokens and seconds of the steps since the last shown progress line
        self.sinks = []
        if is_main:
            dropped = _drop_rows_after(self.path, resumed_step)
            self.sinks = _external_sinks(cfg, stage_dir, resumed_step, dropped)

    def train(self, step: int, metrics: dict[str, float], every: int) -> None:
        """The progress shows loss and lr of this step, and tok_s as the mean over the steps
        since the last shown line (one step's rate swings with its lengths and pauses);
        metrics.jsonl keeps each step's own values."""
        seconds = next((metrics[key] for key in RATE_SECONDS if key in metrics), 1.0)
        self.window = (self.window[0] + metrics["tokens_per_s"] * seconds, self.window[1] + seconds)
        shown = {"loss": f"{metrics.get('loss', float('nan')):.4f}", "lr": f"{metrics['lr']:.2e}",
                 "tok_s": f"{self.window[0] / self.window[1] if self.window[1] > 0 else 0.0:.0f}"}
        if "accuracy" in metrics:  # the reward model's headline number
            shown["acc"] = f"{metrics['accuracy']:.3f}"
        if self.bar.update(1, **shown):
            self.window = (0.0, 0.0)
        if step % every == 0:
            self._write(step, {f"train/{k}": v for k, v in metrics.items()})

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        """All of `metrics` go to metrics.jsonl; the printed line leaves out the loss's
        internal counters (`count/...`: pairs, kept samples, weight sums)."""
        if metrics:
            self._write(step, {f"val/{k}": v for k, v in metrics.items()})
            if self.is_main:
                shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith(COUNT))
                self.bar.write(f"step {step} validation: {shown}")

    def _write(self, step: int, row: dict[str, float]) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **row}) + "\n")
        for sink in self.sinks:
            sink(step, row)

    def close(self) -> None:
        self.bar.close()


def _drop_rows_after(path: Path, step: int) -> bool:
    """A killed run logged steps past its last checkpoint (and maybe half a line); the
    resumed run logs them again. The file is rewritten only then, its other rows copied as
    they are; returns whether steps were dropped. Streamed (a long run's file holds 100k
    rows): one pass reads the rows, another copies the lines kept."""
    past, torn = set(), None  # the numbers of the lines of steps past `step`, and of a torn last line
    for number, row in numbered_rows(path):
        if row is None:
            torn = number
        elif row["step"] > step:
            past.add(number)
    if past or torn is not None:
        with open(path, "rb") as lines, atomic_file(path, "wb") as out:
            for number, line in enumerate(lines, 1):
                if not is_blank(line) and number not in past and number != torn:
                    out.write(line.rstrip(b"\r\n") + b"\n")
    return bool(past)


WANDB_ID_FILE = "wandb_id"  # the stage's W&B run, which every resumed execution continues


def _external_sinks(cfg: LoggingConfig, stage_dir: Path, resumed_step: int, dropped: bool) -> list:
    """LoggingConfig checked at validation that the enabled packages are installed. The
    curves follow metrics.jsonl: TensorBoard drops the steps logged past the checkpoint the
    run starts from (`purge_step`; all of them on a fresh start). W&B cannot take a step
    again, so it resumes the stage's run (its saved id) only where that run ended; after a
    fresh start, or steps `dropped` past the checkpoint, it starts a new run."""
    sinks = []
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(stage_dir) / "tensorboard"), purge_step=resumed_step + 1)
        sinks.append(lambda step, row: [writer.add_scalar(k, v, step) for k, v in row.items()] and writer.flush())
    if cfg.wandb:
        import wandb

        id_file = Path(stage_dir) / WANDB_ID_FILE
        if not id_file.exists() or not resumed_step or dropped:
            write_atomic(id_file, wandb.util.generate_id())
        run = wandb.init(project=cfg.wandb_project, name=Path(stage_dir).name, dir=str(stage_dir),
                         id=id_file.read_text().strip(), resume="allow")
        sinks.append(lambda step, row: run.log(row, step=step))
    return sinks
