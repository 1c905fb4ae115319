"""The one training loop every training stage uses (SFT, reward model, offline alignment).

A stage supplies a `Task` (how a micro-batch becomes a loss) and `TrainData` (items and a
collate function); the loop owns everything else: data order and position, gradient
accumulation, loss normalization over the global batch, clipping, the schedule,
validation, metrics, checkpoints and resumption.

Data order: an endless stream of seeded permutations of the training items, one per
epoch. Optimizer step s consumes stream positions [s*G, (s+1)*G) for a global batch of G;
data-parallel rank r takes a contiguous 1/dp of them, cut into micro-batches. The stream
position is saved with each checkpoint, so a resumed run continues with exactly the
items it would have seen.

Stopping early: SIGTERM or SIGUSR1 (Slurm sends SIGUSR1 `cluster.signal_lead_s` ahead of a
job's time limit, see launcher.render) or a first Ctrl-C only sets a flag (a second Ctrl-C
interrupts at once). At the next step boundary every
rank learns whether any rank got one (a MAX over one int per step), and if so all save a
checkpoint and leave with `STOPPED_EXIT_CODE`; a rerun resumes there. The handlers that were
installed before `train` are restored when it returns.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from offline_rlhf.checkpoint import (
    CONFIG_KEY,
    CheckpointMeta,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from offline_rlhf.config.errors import ConfigError, ResumeRefused
from offline_rlhf.config.schema import LoggingConfig, ModelConfig, OptimConfig, TrainConfig
from offline_rlhf.ledger import Usage
from offline_rlhf.parallel.grad import clip_grad_norm_, sum_head_norm_grads
from offline_rlhf.parallel.parallelize import loss_context
from offline_rlhf.runtime import SAME_INPUTS, Runtime, any_rank, autocast_for, same_on_every_rank
from offline_rlhf.stage_support import TRAINING_DATA, check_checkpoint_resumable
from offline_rlhf.train.metrics_log import MetricsLog, throughput_metrics
from offline_rlhf.train.schedule import build_optimizer, build_scheduler, resume_schedule

Batch = dict[str, torch.Tensor]
COUNT = "count/"
# Ctrl-C (SIGINT) too: the first saves like them, a second one interrupts at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# sysexits' EX_TEMPFAIL: stopped on request with a checkpoint saved; a rerun continues.
STOPPED_EXIT_CODE = 75
FINAL = "final"  # checkpoint metadata: the last step of its schedule, validated, with the final metadata


@dataclass
class Task:
    """What differs between stages. `loss(model, batch, normalizer)` returns the loss for
    backward (already divided by the global normalizer) and metric SUMS; `normalizer(batch)`
    counts the units the loss averages over (response tokens, preference pairs);
    `tokens(batch)` counts tokens processed (throughput and the ledger)."""

    loss: Callable[[nn.Module, Batch, float], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    normalizer: Callable[[Batch], float]
    tokens: Callable[[Batch], int]
    # Metrics named `count/...` are reported as global sums; `derive` may turn them into
    # ratios (e.g. the fraction of samples a reward filter kept).
    derive: Callable[[dict[str, float]], dict[str, float]] | None = None

    def reduce(self, keys: list[str], totals: list[float], normalizer: float) -> dict[str, float]:
        metrics = {key: total if key.startswith(COUNT) else total / normalizer for key, total in zip(keys, totals)}
        return {**metrics, **self.derive(metrics)} if self.derive else metrics


@dataclass
class TrainData:
    train: Sequence[Any]
    val: Sequence[Any]
    collate: Callable[[list[Any]], Batch]
    seq_len: int  # the padded length, for the analytic FLOPs count


@dataclass
class CheckpointSpec:
    root: Path
    model: ModelConfig
    head: str
    tokenizer_dir: Path | None = None
    # Called on the trained model before the final save; returns checkpoint metadata
    # (e.g. the reward model's normalization statistics). Collective.
    final_metadata: Callable[[nn.Module], dict] | None = None
    # The config a resumed run must match (stage_support.resume_fingerprint or
    # training_fingerprint); None: unchecked.
    fingerprint: dict | None = None
    # Recorded in every save, intermediate ones included (e.g. the chat template).
    metadata: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    steps: int
    last_val: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None


class SampleStream:
    """Item indices as an endless concatenation of seeded permutations (one per epoch)."""

    def __init__(self, size: int, seed: int):
        if size == 0:
            raise ValueError("no training items")
        self.size, self.seed = size, seed
        self._cache: dict[int, list[int]] = {}

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            order = list(range(self.size))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._cache = {epoch: order}
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        return [self._epoch(pos // self.size)[pos % self.size] for pos in range(start, start + count)]


def total_steps(cfg: TrainConfig, num_items: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * num_items / cfg.global_batch))


def repeats_warning(cfg: TrainConfig, num_items: int, dp: int) -> str | None:
    """A global batch larger than the data makes every step hold items more than once (the
    stream wraps into the next epoch's permutation within the step): worth one line."""
    if num_items >= cfg.global_batch:
        return None
    unit = cfg.micro_batch * dp
    fits = num_items // unit * unit
    fix = (f"set train.global_batch to at most {fits} (a multiple of train.micro_batch x data-parallel size = "
           f"{unit})" if fits else f"add data (at least {unit} items, train.micro_batch x data-parallel size)")
    return (f"warning: train.global_batch={cfg.global_batch} is larger than the {num_items} training items, so "
            f"every step holds items more than once (each about {cfg.global_batch / num_items:.1f} times); {fix}")


class StoppedBySignal(SystemExit):
    """`train` saved a checkpoint on SIGTERM/SIGUSR1/SIGINT and stops; the process exits with
    STOPPED_EXIT_CODE (a SystemExit, so no `except Exception` on the way swallows it)."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(STOPPED_EXIT_CODE)
        self.step, self.checkpoint = step, checkpoint

    @classmethod
    def after_saving(cls, step: int, steps: int, checkpoint: Path, rt: Runtime) -> "StoppedBySignal":
        """The stop, said in one line on rank 0."""
        rt.log(f"{rt.stage_dir.name}: stopped by a signal (SIGTERM/SIGUSR1/Ctrl-C) after saving step {step} of "
               f"{steps} to {checkpoint}; exit status {STOPPED_EXIT_CODE}: rerun the same command to resume from it")
        return cls(step, checkpoint)


@dataclass
class _Run:
    """What the steps of one `train` call share."""

    task: Task
    model: nn.Module
    data: TrainData
    cfg: TrainConfig
    rt: Runtime
    usage: Usage
    ckpt: CheckpointSpec
    optimization: tuple  # (optimizer, scheduler)
    grad_clip: float
    stream: SampleStream
    per_rank: int  # items per data-parallel rank and step
    state: TrainState
    steps: int
    log: MetricsLog
    result: TrainResult


def train(task: Task, model: nn.Module, data: TrainData, train_cfg: TrainConfig, optim_cfg: OptimConfig,
          logging_cfg: LoggingConfig, rt: Runtime, usage: Usage, ckpt: CheckpointSpec) -> TrainResult:
    check_same_data(data, ckpt, rt)
    if len(data.train) == 0:  # before any work: one line for the user, not SampleStream's ValueError
        raise TrainingFailed("data", "no training items: every record was skipped as unusable or went to validation "
                             "(dataset_card.md, in this stage's folder or in the one that made its data, counts "
                             "them per source)", "give it usable records, or hold fewer out for validation")
    per_rank = rt.dims.per_rank_batch(train_cfg.global_batch, train_cfg.micro_batch)
    steps = total_steps(train_cfg, len(data.train))
    warning = repeats_warning(train_cfg, len(data.train), rt.dims.dp)
    if warning:
        rt.log(warning)
    optimizer = build_optimizer(model.parameters(), optim_cfg, rt.device)
    scheduler = build_scheduler(optimizer, steps, optim_cfg)
    resumed, resumed_from = _resume(ckpt, model, optimizer, scheduler, steps, rt)
    state = resumed.train_state if resumed else TrainState(data_position={"samples_consumed": 0})
    usage.resumed = resumed_from is not None  # the ledger charges the executions whose checkpoints this continues
    stream = SampleStream(len(data.train), train_cfg.seed)
    micro_batches = per_rank // train_cfg.micro_batch
    rt.log(f"training: {len(data.train)} items, {steps} steps of {train_cfg.global_batch} "
           f"({micro_batches} micro-batch{'es' if micro_batches != 1 else ''} of {train_cfg.micro_batch} per rank), "
           f"starting at step {state.step}")
    if (note := optim_cfg.warmup_note(steps)) is not None:
        rt.log(note)
    log = MetricsLog(rt.stage_dir, logging_cfg, rt.is_main, resumed_step=state.step, total_steps=steps)
    run = _Run(task, model, data, train_cfg, rt, usage, ckpt, (optimizer, scheduler), optim_cfg.grad_clip, stream,
               per_rank, state, steps, log, TrainResult(steps=steps, checkpoint=resumed_from))
    if resumed is not None and state.step == steps and not resumed.metadata.get(FINAL):
        # Saved as an intermediate step of a longer schedule (or before final steps were marked):
        # the end's validation and final metadata (reward statistics, DT target) are still due.
        _validate_and_save(run, final=True, stopping=False)
    with stop_requests() as requested:
        while state.step < steps:
            _step(run)
            final = state.step == steps
            # The last step finishes normally; a stop skips this step's validation: the time
            # before Slurm's kill is for the save.
            stopping = not final and any_rank(requested.is_set(), rt.device, rt.group)
            _validate_and_save(run, final, stopping)
            if stopping:
                log.close()
                raise StoppedBySignal.after_saving(state.step, steps, run.result.checkpoint, rt)
    log.close()
    return run.result


def check_same_data(data: TrainData, ckpt: CheckpointSpec, rt: Runtime) -> None:
    """Every rank trains on the same items (`same_on_every_rank`: their counts and the
    fingerprint's digest of the training items): with other counts the ranks plan other step
    counts and hang at mismatched collectives; with the same, they would train on other items."""
    seen = {"training items": len(data.train), "validation items": len(data.val)}
    if ckpt.fingerprint is not None and TRAINING_DATA in ckpt.fingerprint:
        seen["sha256"] = ckpt.fingerprint[TRAINING_DATA]
    same_on_every_rank(rt, seen, "data", "training data", SAME_INPUTS)


def _step(run: _Run) -> None:
    """One optimizer step with its accounting, metrics and learned-anything check."""
    started = time.perf_counter()
    batches = _micro_batches(run.data, run.stream, run.state, run.cfg, run.per_rank, run.rt.dp_rank)
    loaded = time.perf_counter()
    metrics, tokens = _optimizer_step(run.task, run.model, run.optimization, batches, run.state, run.cfg,
                                      run.grad_clip, run.rt)
    run.usage.tokens += tokens
    run.usage.beat()
    metrics.update(throughput_metrics(tokens, time.perf_counter() - started, loaded - started, run.ckpt.model,
                                      run.ckpt.head, run.data.seq_len, run.rt))
    run.log.train(run.state.step, metrics, every=run.cfg.log_every)
    check_learned(run.model, run.state, run.steps, run.cfg, run.rt)


def _validate_and_save(run: _Run, final: bool, stopping: bool) -> None:
    """After a step: validation every val_every steps and at the end (not when stopping), a
    checkpoint every save_every steps, at the end and when stopping."""
    step, cfg = run.state.step, run.cfg
    if not stopping and (final or (cfg.val_every and step % cfg.val_every == 0)):
        run.result.last_val = validate(run.task, run.model, run.data, cfg, run.rt)
        run.log.validation(step, run.result.last_val)
    if stopping or final or step % cfg.save_every == 0:
        metadata = {}
        if final:
            metadata = {FINAL: True, **(run.ckpt.final_metadata(run.model) if run.ckpt.final_metadata else {})}
        run.result.checkpoint = _save(run.ckpt, run.model, *run.optimization, run.state, cfg, metadata, run.rt)
        run.usage.beat(force=True)  # a later kill then still accounts for everything up to here


def _optimizer_step(task: Task, model: nn.Module, optimization: tuple, batches: list[Batch], state: TrainState,
                    cfg: TrainConfig, grad_clip: float, rt: Runtime) -> tuple[dict[str, float], int]:
    """One step on `batches`: (optimizer, scheduler) advanced, `state` counting it (step,
    tokens, the data position and skipped steps a checkpoint saves); its metrics with the
    rate it used, and its tokens."""
    optimizer, scheduler = optimization
    lr = scheduler.get_last_lr()[0]
    metrics, tokens = train_step(task, model, optimizer, batches, rt, grad_clip)
    scheduler.step()
    state.step += 1
    state.tokens_seen += tokens
    consumed = state.data_position.get("samples_consumed", 0) + cfg.global_batch
    skipped = state.data_position.get("skipped_steps", 0) + int(metrics["skipped_step"])
    state.data_position = {"samples_consumed": consumed, "skipped_steps": skipped}
    return {**metrics, "lr": lr}, tokens


@contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """An event STOP_SIGNALS set while the block runs; the previous handlers come back after.
    Handlers can only be installed from the main thread: elsewhere the signals keep theirs."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def request(signum, frame):
        if signum == signal.SIGINT and requested.is_set():
            raise KeyboardInterrupt  # Ctrl-C again: no waiting for the step and its save
        requested.set()

    # SIGINT ignored from the start (a shell's background job) stays ignored; SIGUSR1 does not:
    # the launcher's Slurm steps ignore it above the workers, which must take it.
    taken = [sig for sig in STOP_SIGNALS if sig != signal.SIGINT or signal.getsignal(sig) != signal.SIG_IGN]
    previous = {sig: signal.signal(sig, request) for sig in taken}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            # None: a handler installed outside Python, which cannot be reinstalled; the default.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


class TrainingFailed(ConfigError):
    """Training ran but learned nothing usable: the stage fails (no final checkpoint, no
    DONE) with one line naming the setting to change."""


def check_learned(model: nn.Module, state: TrainState, steps: int, cfg: TrainConfig, rt: Runtime) -> None:
    """After each step, before its save. A skipped step (non-finite loss or gradient norm) leaves
    the weights as they were, so a run of mostly skipped steps is the initial model with a
    DONE on it: fail as soon as the share of `steps` is certain to be exceeded. At the last
    step the weights must be finite (collective: it reduces over every rank)."""
    skipped = state.data_position.get("skipped_steps", 0)
    if skipped > cfg.max_skipped_fraction * steps:
        raise TrainingFailed("train.max_skipped_fraction",
                             f"{skipped} of {state.step} steps (of {steps} planned) were skipped for a non-finite "
                             f"loss or gradient norm, more than {cfg.max_skipped_fraction:g} of the run, so the model "
                             "learned little or nothing; no final checkpoint or DONE was written",
                             "lower optim.lr or check the data for extreme values (metrics.jsonl: train/skipped_step)")
    if state.step == steps and not weights_finite(model, rt):
        raise TrainingFailed("optim", "the final weights hold NaN or Inf (the optimizer diverged); no final "
                             "checkpoint or DONE was written", "lower optim.lr and rerun")


def weights_finite(model: nn.Module, rt: Runtime) -> bool:
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    bad = torch.zeros((), device=rt.device)
    for tensor in local:
        bad += (~torch.isfinite(tensor.detach())).sum()
    return not any_rank(bool(bad), rt.device, rt.group)  # any rank's shard spoils the model


def train_step(task: Task, model: nn.Module, optimizer, batches: list[Batch], rt: Runtime,
               grad_clip: float) -> tuple[dict[str, float], int]:
    """zero grad, micro-batches, clip, step. Returns (metrics averaged over the global
    batch, tokens processed by the whole data-parallel group)."""
    counted = _dp_sum(rt, [float(sum(task.normalizer(b) for b in batches))])[0]
    normalizer = divisor(counted)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=rt.device))
    tokens, step_loss = 0, torch.zeros((), device=rt.device)
    for index, batch in enumerate(batches):
        tokens += task.tokens(batch)  # counted on the host: on the device, reading the count would wait for the step
        batch = _to_device(batch, rt.device)
        _set_gradient_sync(model, index == len(batches) - 1)
        with autocast_for(rt.device), loss_context(rt.dims):
            loss, metrics = task.loss(model, batch, normalizer)
            # FSDP/DDP average gradients over dp ranks; the loss is already a global mean.
            (loss * rt.dims.dp).backward()
        step_loss += loss.detach().float()
        for key, value in metrics.items():
            sums[key] += value.float()
    keys = sorted(sums)
    # Reduced before the step decision, so every rank skips when any rank's loss is not
    # finite: a loss that overflows may leave a finite gradient (e.g. where a clipped error
    # wins, its gradient is 0), which the norm alone would let through.
    *totals, tokens, step_loss = _dp_sum(rt, [sums[k] for k in keys] + [float(tokens), step_loss])
    sum_head_norm_grads(model)
    grad_norm = clip_grad_norm_(model.parameters(), grad_clip)
    finite = math.isfinite(step_loss) and bool(torch.isfinite(grad_norm))  # global: the same on every rank
    # With nothing to learn from (counted == 0, global), Adam's momentum and weight decay
    # would still move every weight: no step either.
    if finite and counted > 0:
        optimizer.step()
    else:  # one bad batch must not write NaN into every weight; the step is skipped and logged
        optimizer.zero_grad(set_to_none=True)
    metrics = task.reduce(keys, totals, normalizer)
    metrics["grad_norm"] = float(grad_norm)
    metrics["skipped_step"] = float(not finite)
    return metrics, int(tokens)


def validation_items(val: Sequence[Any], cfg: TrainConfig) -> list[Any]:
    """The whole split, or its first `val_batches` global batches: the same items under any
    layout (counted in micro-batches per rank they were more with more ranks or larger
    micro-batches, and the metric moved with the layout)."""
    return list(val)[: cfg.val_batches * cfg.global_batch] if cfg.val_batches else list(val)


@torch.no_grad()
def validate(task: Task, model: nn.Module, data: TrainData, cfg: TrainConfig, rt: Runtime) -> dict[str, float]:
    """Every validation item once, split over dp ranks. Ranks run the same number of
    forwards (FSDP gathers weights collectively), repeating a batch with zero weight
    where a rank has run out of items."""
    items = validation_items(data.val, cfg)
    if not items:
        return {}
    mine = items[rt.dp_rank::rt.dims.dp]
    rounds = math.ceil(math.ceil(len(items) / rt.dims.dp) / cfg.micro_batch)
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=rt.device))
    normalizer = 0.0
    model.eval()
    for index in range(rounds):
        chunk = mine[index * cfg.micro_batch:(index + 1) * cfg.micro_batch]
        batch = _to_device(data.collate(chunk or items[: cfg.micro_batch]), rt.device)
        with autocast_for(rt.device), loss_context(rt.dims):
            _, metrics = task.loss(model, batch, 1.0)
        if chunk:
            normalizer += task.normalizer(batch)
        for key, value in metrics.items():
            # A rank without items still adds (zero to) every key: all ranks must reduce the
            # same list, or gloo aborts (a validation set smaller than the dp size did).
            sums[key] += value.float() if chunk else 0.0
    model.train()
    keys = sorted(sums)
    totals = _dp_sum(rt, [sums[k] for k in keys] + [normalizer])
    return task.reduce(keys, totals[:-1], divisor(totals[-1]))


def divisor(count: float) -> float:
    """What a global batch's loss and metric sums are divided by: the count of the units they
    average over, or 1 when there are none (an all-filtered batch gives 0, not NaN). Not
    floored at 1: RWR's weighted token count (rwr_normalize) may legitimately be far below it."""
    return count if count > 0 else 1.0


def _micro_batches(data: TrainData, stream: SampleStream, state: TrainState, cfg: TrainConfig, per_rank: int,
                   dp_rank: int) -> list[Batch]:
    start = state.data_position.get("samples_consumed", 0) + dp_rank * per_rank
    indices = stream.take(start, per_rank)
    return [data.collate([data.train[i] for i in indices[at:at + cfg.micro_batch]])
            for at in range(0, per_rank, cfg.micro_batch)]


def _resume(ckpt: CheckpointSpec, model, optimizer, scheduler, steps: int,
            rt: Runtime) -> tuple[CheckpointMeta | None, Path | None]:
    """The latest checkpoint's meta and path, loaded into model, optimizer and schedule
    (None, None: a fresh start)."""
    latest = (latest_checkpoint(ckpt.root) if ckpt.fingerprint is None
              else check_checkpoint_resumable(ckpt.root, ckpt.fingerprint))
    if latest is None:
        return None, None
    saved = read_meta(latest)
    if saved.train_state.step > steps:  # finishing "at" a step behind the checkpoint would mark it final
        raise ResumeRefused("train.max_steps", f"the run now ends at step {steps}, before the "
                            f"{saved.train_state.step} steps {latest} already holds",
                            f"set train.max_steps={saved.train_state.step} (or more, or train.epochs to reach it) to "
                            f"finish with it, or delete {ckpt.root} to start this stage over")
    meta = load_checkpoint(latest, model, optimizer, restore_rng=True, group=rt.group)
    rt.log(f"resuming from {latest} (step {meta.train_state.step})")
    if meta.scheduler:
        resume_schedule(scheduler, meta.scheduler)
        saved_lr, lr = meta.scheduler.get("_last_lr", [None])[0], scheduler.get_last_lr()[0]
        if saved_lr is not None and saved_lr != lr:  # intended (the new run's schedule), but not silently
            rt.log(f"the learning-rate schedule now spans {steps} steps (train.max_steps or train.epochs changed "
                   f"since step {meta.train_state.step} was saved): the rate of step {meta.train_state.step + 1} "
                   f"jumps from {saved_lr:.2e} to {lr:.2e}")
    return meta, latest


def _save(ckpt: CheckpointSpec, model, optimizer, scheduler, state: TrainState, cfg: TrainConfig,
          metadata: dict, rt: Runtime) -> Path:
    metadata = {**ckpt.metadata, **metadata}
    if ckpt.fingerprint is not None:
        metadata = {**metadata, CONFIG_KEY: ckpt.fingerprint}
    meta = CheckpointMeta(model=ckpt.model, head=ckpt.head, train_state=state, scheduler=scheduler.state_dict(),
                          metadata=metadata)
    return save_checkpoint(ckpt.root, model, meta, optimizer=optimizer, tokenizer_dir=ckpt.tokenizer_dir,
                           keep_last=cfg.keep_last, group=rt.group)


def _dp_sum(rt: Runtime, values: list) -> list[float]:
    """Sum scalars over the data-parallel group (TP ranks hold identical copies)."""
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(rt.device) for v in values])
    if rt.mesh is not None and rt.dims.dp > 1:
        dist.all_reduce(packed, group=rt.mesh.get_group("dp"))
    return packed.tolist()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2: reduce-scatter gradients only after the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
