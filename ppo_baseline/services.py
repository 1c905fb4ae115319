"""The three model services of the PPO baseline, each a WorldService around the project's
own machinery (paper Sec. 4's modules besides the actor):

- reward: the trained reward model; POST /score -> one normalized reward per sequence
  (z-scored with the statistics `orlhf rm` stored in the checkpoint).
- reference: the initial (SFT) policy, frozen; POST /logprobs -> per-token log-probs.
- critic: the reward model's backbone and value head, trained with its own optimizer;
  POST /values, /train (clipped value loss, PPO minibatches), /save and /load.

`build_service(cfg, rt, token, usage)` builds the one `cfg.name` asks for on every rank
of `rt`; `ppo_baseline.serve` runs it as a process (or torchrun world) of its own.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from offline_rlhf.checkpoint import (
    REWARD_STATS,
    TOKENIZER_DIR,
    CheckpointMeta,
    TrainState,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from offline_rlhf.checkpoint_meta import checkpoint_of_head
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.data.packing import unpacked
from offline_rlhf.data.tokenize import IGNORE_INDEX, TokenizedSample
from offline_rlhf.labeling.normalize import normalize
from offline_rlhf.labeling.scoring import load_reward_model, score_sequences, scoring_setup
from offline_rlhf.ledger import Usage
from offline_rlhf.parallel.parallelize import build_model
from offline_rlhf.runtime import Runtime
from offline_rlhf.stage_support import load_inference_model, note_untrusted
from offline_rlhf.train.loop import Task, TrainingFailed, weights_finite
from offline_rlhf.train.schedule import build_optimizer, build_scheduler, resume_schedule
from ppo_baseline.algorithm import value_loss
from ppo_baseline.config import ServiceConfig
from ppo_baseline.models import (
    SEQUENCES,
    STEP,
    TRAIN,
    check_sequences,
    critic_values,
    response_logprobs,
    shifted_values,
    train_epochs,
)
from ppo_baseline.service import NonFiniteAnswer
from ppo_baseline.wire import Payload
from ppo_baseline.world import WorldService

# Checkpoint folders are step_%08d (offline_rlhf.checkpoint.step_dir_name): a larger step
# would sort among them by its text, not its value.
MAX_STEP = 10**8
CRITIC_LIMIT = "the critic's max_seq_len"  # what a critic request is checked against
# The largest |returns| or |old_values| a /train request may hold. The actor's are sums of
# z-scored rewards and KL penalties, far below it; the value loss squares them in fp32, where
# returns of 4e18 already overflowed the tiny test critic's, so larger ones are the request's
# fault (400), refused before the critic's step, schedule or weights change.
MAX_TARGET = 1e6


def build_service(cfg: ServiceConfig, rt: Runtime, token: str, usage: Usage | None = None) -> WorldService:
    """The service `cfg.name`, built (and its model loaded) on every rank of `rt`."""
    service = WorldService(cfg.name, token, rt, host=cfg.host, port=cfg.port, max_body_bytes=cfg.max_body_mb * 2**20)
    {"reward": _reward, "reference": _reference, "critic": _critic}[cfg.name](service, cfg, rt, usage)
    return service


def _count(usage: Usage | None, payload: Payload) -> None:
    if usage is not None:
        usage.tokens += int(payload.tensors["lengths"].sum())
        usage.beat()


def _key(cfg: ServiceConfig) -> str:
    return f"services.{cfg.name}.checkpoint"


def _step(payload: Payload) -> int:
    """The request's `step` (an actor iteration): an int, not a bool (JSON true passes the
    schema's int), in [0, MAX_STEP); a ValueError (HTTP 400) otherwise."""
    step = payload.meta["step"]
    if isinstance(step, bool) or not 0 <= step < MAX_STEP:
        raise ValueError(f"metadata 'step' must be an integer in [0, {MAX_STEP}), got {step!r}")
    return step


def reward_statistics(metadata: dict, checkpoint: str, key: str) -> dict:
    """The z-score statistics `orlhf rm` stored in the reward model's metadata, which PPO
    normalizes its rewards with: present, with a finite mean and std."""
    if REWARD_STATS not in metadata:
        raise ConfigError(key, f"the reward model {checkpoint} stores no reward statistics, "
                          "which PPO normalizes its rewards with", "pass a checkpoint written by `orlhf rm`")
    stats = metadata[REWARD_STATS]
    if not all(isinstance(stats.get(name), (int, float)) and math.isfinite(stats[name]) for name in ("mean", "std")):
        raise ConfigError(key, f"the reward statistics of {checkpoint} are not finite numbers (mean "
                          f"{stats.get('mean')}, std {stats.get('std')}): every reward would be NaN",
                          "use a reward model whose `orlhf rm` run recorded finite statistics")
    return stats


def _reward(service: WorldService, cfg: ServiceConfig, rt: Runtime, usage: Usage | None) -> None:
    model, tokenizer, metadata = load_reward_model(cfg.settings.checkpoint, rt, _key(cfg))
    stats = reward_statistics(metadata, cfg.settings.checkpoint, _key(cfg))
    # The actor sends token ids rendered in the policy's template; it checked that this
    # model was trained with that template (ppo_baseline.stage.policy_template).
    _, max_len = scoring_setup(metadata, model.cfg, tokenizer)
    model.eval()

    def score(payload: Payload) -> Payload:
        check_sequences(payload, model.cfg.vocab_size, max_len, "the reward model's recorded training length")
        rows = zip(payload.tensors["tokens"].tolist(), payload.tensors["lengths"].tolist())
        sequences = unpacked([TokenizedSample(tuple(ids[:n]), (IGNORE_INDEX,) * n, "ppo", False) for ids, n in rows])
        raw = score_sequences(model, sequences, cfg.settings.batch_size, rt, tokenizer.pad_id)
        _count(usage, payload)
        return Payload({"rewards": torch.tensor(normalize(raw, stats), dtype=torch.float32),
                        "raw": torch.tensor(raw, dtype=torch.float32)})

    service.route("score", score, SEQUENCES)


def _reference(service: WorldService, cfg: ServiceConfig, rt: Runtime, usage: Usage | None) -> None:
    model = load_inference_model(resolve_checkpoint(cfg.settings.checkpoint, _key(cfg)), "lm", rt, _key(cfg))

    def logprobs(payload: Payload) -> Payload:
        check_sequences(payload, model.cfg.vocab_size, model.cfg.max_seq_len, "the reference model's max_seq_len")
        result = response_logprobs(model, payload.tensors, rt, cfg.settings.batch_size)
        _count(usage, payload)
        return Payload({"logprobs": result})

    service.route("logprobs", logprobs, SEQUENCES)


def value_task(clip: float) -> Task:
    """The critic's loss for the generic train step: clipped value loss per response token,
    normalized by the minibatch's response tokens (all micro-batches and DP ranks)."""
    def loss(model, batch, normalizer):
        values = shifted_values(model(batch["tokens"]))
        return value_loss(values, batch["old_values"], batch["returns"], batch["mask"], normalizer, clip)
    return Task(loss=loss, normalizer=lambda b: float(b["mask"].sum()), tokens=lambda b: int(b["lengths"].sum()))


class Critic:
    """The critic's model, optimizer and schedule. Starts from the reward model's weights
    (backbone and value head); `load(step)` restores a checkpoint it saved for the actor's
    iteration `step` (a resumed run)."""

    def __init__(self, cfg: ServiceConfig, rt: Runtime):
        self.cfg, self.rt, self.ppo = cfg, rt, cfg.ppo
        self.ppo.check_split(rt.dims.dp, "critic", "services.critic.nproc", "the critic's data-parallel size")
        path = resolve_checkpoint(cfg.settings.checkpoint, _key(cfg))
        self.meta = checkpoint_of_head(path, "value", _key(cfg))
        self.tokenizer = path / TOKENIZER_DIR if (path / TOKENIZER_DIR).is_dir() else None
        self.model = build_model(self.meta.model, "value", rt.dims, rt.mesh, rt.device)
        note_untrusted(path, rt)
        load_checkpoint(path, self.model, group=rt.group)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.settings.optim, rt.device)
        total = self.ppo.iterations * self.ppo.epochs * (self.ppo.rollout_batch // self.ppo.minibatch)
        self.scheduler = build_scheduler(self.optimizer, total, cfg.settings.optim)
        self.task = value_task(self.ppo.value_clip)
        self.root = Path(cfg.run_dir) / "ppo" / "critic" / "checkpoints"

    def check(self, payload: Payload) -> int:
        """What a training batch must hold besides `check_sequences`; its step. A ValueError
        (HTTP 400) here comes before anything about the critic changes."""
        rows = payload.tensors["tokens"].shape[0]
        if rows % self.ppo.minibatch:
            raise ValueError(f"a training batch of {rows} rows does not split into minibatches of "
                             f"{self.ppo.minibatch}")
        for name in ("returns", "old_values"):
            largest = float(payload.tensors[name].abs().max())
            if largest > MAX_TARGET:
                raise ValueError(f"tensor {name!r} holds a value of magnitude {largest:.3g}; the critic takes "
                                 f"|{name}| <= {MAX_TARGET:g}")
        return _step(payload)

    def train(self, payload: Payload) -> dict[str, float]:
        """`ppo.epochs` passes over the batch in minibatches of `ppo.minibatch` rows, in an
        order seeded by (seed, step, epoch); each minibatch is one optimizer step, one whose
        loss or gradient is not finite skipped. A non-finite result raises NonFiniteAnswer
        (HTTP 500: the request was checked, so the critic diverged) with the schedule put
        back where it was."""
        step = self.check(payload)
        schedule = self.scheduler.state_dict()
        self.model.train()
        metrics = train_epochs(self.task, self.model, self.optimizer, self.scheduler, payload.tensors, self.ppo,
                               self.cfg.seed, step, self.cfg.settings.optim.grad_clip, self.rt)
        metrics = {("value_loss" if key == "loss" else f"critic_{key}"): value for key, value in metrics.items()}
        if bad := [key for key, value in metrics.items() if not math.isfinite(value)]:
            resume_schedule(self.scheduler, schedule)
            raise NonFiniteAnswer(f"critic /train computed a NaN or infinite {', '.join(bad)} at step {step}; its "
                                  "steps with a non-finite loss were skipped and its schedule and step are as before")
        return metrics

    def save(self, step: int) -> Path:
        """The critic's checkpoint of the actor's iteration `step`. Non-finite weights fail the
        run (the actor saves after the critic, so no actor checkpoint or DONE follows): the
        last iteration's update would otherwise reach the final checkpoint unnoticed, as no
        later values call returns its NaN."""
        if not weights_finite(self.model, self.rt):
            raise TrainingFailed("services.critic.optim.lr", f"the critic's weights are not finite after iteration "
                                 f"{step}; its checkpoint was not written", "lower services.critic.optim.lr and rerun")
        meta = CheckpointMeta(model=self.meta.model, head="value", train_state=TrainState(step=step),
                              scheduler=self.scheduler.state_dict(), metadata=self.meta.metadata)
        return save_checkpoint(self.root, self.model, meta, optimizer=self.optimizer, tokenizer_dir=self.tokenizer,
                               keep_last=self.cfg.keep_last + 1, group=self.rt.group)

    def load(self, step: int) -> None:
        path = self.root / step_dir_name(step)
        if not path.is_dir():
            raise ValueError(f"the critic has no checkpoint for step {step} in {self.root}")
        meta = load_checkpoint(path, self.model, self.optimizer, group=self.rt.group)
        resume_schedule(self.scheduler, meta.scheduler)


def _critic(service: WorldService, cfg: ServiceConfig, rt: Runtime, usage: Usage | None) -> Critic:
    critic = Critic(cfg, rt)

    def values(payload: Payload) -> Payload:
        check_sequences(payload, critic.meta.model.vocab_size, critic.meta.model.max_seq_len, CRITIC_LIMIT)
        critic.model.eval()
        result = critic_values(critic.model, payload.tensors, rt, cfg.settings.batch_size)
        _count(usage, payload)
        return Payload({"values": result})

    def train(payload: Payload) -> Payload:
        check_sequences(payload, critic.meta.model.vocab_size, critic.meta.model.max_seq_len, CRITIC_LIMIT)
        metrics = critic.train(payload)  # checks the request first, and its own result
        _count(usage, payload)
        service.step = payload.meta["step"] + 1
        return Payload(meta={"step": service.step, **metrics})

    def save(payload: Payload) -> Payload:
        step = _step(payload)
        return Payload(meta={"step": step, "path": str(critic.save(step))})

    def load(payload: Payload) -> Payload:
        critic.load(_step(payload))
        service.step = payload.meta["step"]
        return Payload(meta={"step": service.step})

    service.route("values", values, SEQUENCES)
    service.route("train", train, TRAIN)
    service.route("save", save, STEP)
    service.route("load", load, STEP)
    return critic

