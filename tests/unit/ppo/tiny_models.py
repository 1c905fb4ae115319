"""Tiny SFT and reward-model checkpoints (random weights, the synthetic tokenizer) and a
running in-process service, for the PPO service tests."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import torch

from offline_rlhf.checkpoint import REWARD_STATS, CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.parallel.dims import ParallelDims
from ppo_baseline.config import PPOAlgorithmConfig, ServiceConfig, ServiceSettings
from ppo_baseline.service import Client
from ppo_baseline.services import build_service
from tests.fixtures import reference_model, runtime_for
from tests.synthetic_preferences import MODEL

TOKEN = "ppo-test-token"
STATS = {"mean": 0.25, "std": 0.5, "count": 10, "source": "test"}
PPO = PPOAlgorithmConfig(iterations=4, rollout_batch=8, minibatch=4, micro_batch=2)


def write_checkpoints(root: Path, tokenizer_dir: Path, stats: dict | None = STATS,
                      sft_metadata: dict | None = None) -> tuple[Path, Path]:
    """(sft, rm) checkpoint roots with seeded random weights."""
    sft, rm = root / "sft" / "checkpoints", root / "rm" / "checkpoints"
    save_checkpoint(sft, reference_model(MODEL, "lm", seed=0),
                    CheckpointMeta(MODEL, "lm", TrainState(step=1), metadata=sft_metadata or {}),
                    tokenizer_dir=tokenizer_dir)
    metadata = {REWARD_STATS: stats} if stats else {}
    save_checkpoint(rm, reference_model(MODEL, "value", seed=1),
                    CheckpointMeta(MODEL, "value", TrainState(step=1), metadata=metadata), tokenizer_dir=tokenizer_dir)
    return sft, rm


def write_skipping_critic(root: Path, tokenizer_dir: Path) -> Path:
    """A critic checkpoint (the reward model's weights, `write_checkpoints`' seed) whose
    every training step is skipped: its final norm weight scaled by 1e30 and its value head
    by 1e-30 keep its values (finite, about those of the reward model), but the value head's
    gradient is about 1e30 times the loss's, so the gradient norm overflows fp32."""
    model = reference_model(MODEL, "value", seed=1)
    with torch.no_grad():
        model.norm.weight.mul_(1e30)
        model.score.weight.mul_(1e-30)
    return save_checkpoint(root, model, CheckpointMeta(MODEL, "value", TrainState(step=1),
                                                       metadata={REWARD_STATS: STATS}), tokenizer_dir=tokenizer_dir)


def service_config(name: str, run_dir: Path, checkpoint: Path, **settings) -> ServiceConfig:
    return ServiceConfig(name=name, run_dir=str(run_dir), ppo=PPO, max_body_mb=1,
                         settings=ServiceSettings(checkpoint=str(checkpoint), batch_size=3, **settings))


def rollout(rows: int = 5, width: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows: a prompt of 3 tokens, then 2..(width-3) response tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, MODEL.vocab_size, (rows, width), generator=gen)
    lengths = torch.randint(5, width + 1, (rows,), generator=gen)
    positions = torch.arange(width)
    tokens = torch.where(positions < lengths[:, None], tokens, 0)
    mask = (positions >= 3) & (positions < lengths[:, None])
    return {"tokens": tokens, "mask": mask, "lengths": lengths}


class Running:
    """A built service on 127.0.0.1 whose calls run on a background thread (single process)."""

    def __init__(self, cfg: ServiceConfig, stage_dir: Path):
        rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None, stage_dir)
        self.service = build_service(replace(cfg), rt, TOKEN)
        self.service.start()
        self.thread = threading.Thread(target=self.service.serve, kwargs={"poll_s": 0.02}, daemon=True)
        self.thread.start()
        self.client = Client(cfg.name, self.service.url, TOKEN, timeout_s=60, retries=0)

    def close(self) -> None:
        self.client.close()
        self.service.stop()
        self.thread.join(10)
