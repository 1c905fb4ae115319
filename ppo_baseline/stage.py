"""`orlhf ppo run_dir=R`: the PPO baseline's actor, driving three services (paper Sec. 4).

The actor is this process, or a torchrun world of processes in the training stages'
layout (DP via FSDP or DDP x TP, `parallel`; ledger stage `ppo_actor`); the reward model,
the reference policy and the critic run as services of their own (`ppo_baseline.launch`),
started and called by rank 0 alone, which shares their answers with the other ranks
(ppo_baseline/actor.py says how the rollout and the update are split). Per iteration:
sample `ppo.rollout_batch` responses, old log-probs, then rewards, reference log-probs and
values from the services at once, KL-shaped rewards and GAE, `ppo.epochs` of minibatch
updates of the actor while the critic trains on the same rollout, metrics. Every
`save_every` iterations (and at the end) the critic saves, then the actor: a rerun resumes
from the actor's last checkpoint and loads the critic's checkpoint of the same iteration.
Whether there is anything to run is decided before any service starts (`resume_point`): a
finished run is not run again, and a start without an actor checkpoint clears the critic's
checkpoints, so that an old run's critic never meets a new actor.
Prompts are cut to fit every module: the policy's, the reference's and the critic's
max_seq_len and the reward model's recorded training length, less generation.max_new_tokens.
A service answering non-finite numbers, or a run whose policy steps or critic steps were
mostly skipped (non-finite gradients) or whose final policy weights (or the critic's
weights at a save) are not finite, fails without DONE.
Outputs in R/ppo/: checkpoints/, metrics.jsonl, critic/checkpoints/, <service>/service.log,
DONE naming the final actor checkpoint (an `lm` checkpoint with its tokenizer and template).
"""

from __future__ import annotations

import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from offline_rlhf.checkpoint import (
    CONFIG_KEY,
    TEMPLATE,
    CheckpointMeta,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from offline_rlhf.config.errors import ConfigError, ResumeRefused
from offline_rlhf.config.schema import InitConfig
from offline_rlhf.data.chat_template import ChatFormat, template_record
from offline_rlhf.data.prompts import read_prompt_mix
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import fit_prompt, stop_token_ids
from offline_rlhf.generation.engine import DecodeSession
from offline_rlhf.host import clear_done, restore_stage
from offline_rlhf.labeling.scoring import scoring_setup
from offline_rlhf.runtime import (
    SAME_INPUTS,
    Runtime,
    any_rank,
    collective_device,
    same_on_every_rank,
    stage_runtime,
)
from offline_rlhf.stage_checks import load_tokenizer
from offline_rlhf.stage_support import (
    check_resumable,
    checkpoint_steps,
    init_template,
    items_digest,
    local_checkpoint,
    local_init,
    mark_done,
    require_template,
    require_tokenizer,
    resume_fingerprint,
)
from offline_rlhf.train.init import TrainingSetup, prepare_training
from offline_rlhf.train.loop import (  # the training stages' checks and stop on a signal
    SampleStream,
    StoppedBySignal,
    TrainingFailed,
    stop_requests,
    weights_finite,
)
from offline_rlhf.train.metrics_log import MetricsLog
from offline_rlhf.train.schedule import build_optimizer, build_scheduler, resume_schedule
from ppo_baseline import algorithm
from ppo_baseline.actor import (
    advantages,
    iteration_generation,
    policy_logprobs,
    refresh,
    rollout_streams,
    sample,
    sampling_model,
    update_policy,
)
from ppo_baseline.config import SERVICES, PPOAlgorithmConfig, PPOConfig
from ppo_baseline.launch import Services, service_gpus
from ppo_baseline.models import LOGPROBS, SAVED, SCORES, STEP, TRAINED, VALUES
from ppo_baseline.serve import serve_in_job
from ppo_baseline.wire import Payload
from ppo_baseline.world import sigterm_exits

STAGE = "ppo_actor"
OUT = "ppo"
POLICY_KEY = "init.checkpoint"
PROMPTS = "prompts"  # the resume fingerprint's key for a digest of the prompts' token ids
# What each service answers, by the key ask_services returns it under: (service, what).
ANSWERS = {"scores": ("reward", "rewards"), "raw": ("reward", "raw rewards"),
           "ref_logp": ("reference", "log-probs"), "values": ("critic", "values")}
# The running counts of skipped steps (non-finite loss or gradient norm), each a metric and a key of
# the actor checkpoint's data_position: (whose steps, the learning rate to lower).
SKIPPED = {"skipped_steps": ("policy", "optim.lr"), "critic_skipped_steps": ("critic", "services.critic.optim.lr")}


def main(cfg: PPOConfig) -> int:
    if cfg.serve:  # a service's job step of the Slurm heterogeneous job
        return serve_in_job(cfg)
    init = local_init(cfg.init, cfg.run_dir)  # a Hugging Face model is imported once, into the run
    model_cfg = read_meta(resolve_checkpoint(init.checkpoint, "init.checkpoint")).model
    template = policy_template(cfg, init, model_cfg)  # checked before any weights load
    # A SIGTERM before the iterations (or during a save) still shuts the services down.
    with sigterm_exits(), stage_runtime(STAGE, cfg.run_dir, cfg.parallel, model_cfg, cfg) as (rt, usage):
        cfg.check_world(rt.dims.dp)
        rt = replace(rt, stage_dir=Path(cfg.run_dir) / OUT)
        earlier = None
        if rt.is_main:
            rt.stage_dir.mkdir(parents=True, exist_ok=True)
            earlier = clear_done(rt.stage_dir)  # the runtime's open_stage cleared R/ppo_actor's only
        try:
            final = run_from_resume_point(cfg, init, rt, usage, model_cfg, template)
        except ResumeRefused:
            if earlier is not None:  # nothing was written: the outputs stand as before, complete or not
                restore_stage(rt.stage_dir, earlier)
            raise
        mark_done(rt, final)
    return 0


def run_from_resume_point(cfg: PPOConfig, init: InitConfig, rt: Runtime, usage, model_cfg,
                          template: ChatTemplate | ChatFormat) -> Path:
    """The final actor checkpoint: the one already holding every iteration, or a new one."""
    start, final = resume_point(cfg, init, rt)  # before any weights load or service starts
    usage.resumed = final is not None  # the ledger charges the executions whose checkpoint this continues
    if start == cfg.ppo.iterations:
        rt.log(f"ppo: {final} already holds all {start} iterations; nothing to do (no service needed)")
        return final
    if rt.is_main:
        service_gpus(cfg)  # too few GPUs for the services started here: refused before any weights load
    final = run_actor(cfg, init, rt, usage, model_cfg, template)
    rt.log(f"ppo done: {cfg.ppo.iterations} iterations, final actor checkpoint {final}")
    return final


def policy_template(cfg: PPOConfig, init: InitConfig, model_cfg) -> ChatTemplate | ChatFormat:
    """The template the policy is prompted with: the one `init.checkpoint` was trained
    with (`init_template`). The reward model, the critic and the reference read the policy's
    token ids, so each must have been trained with it and the policy's tokenizer too."""
    tokenizer, _ = load_tokenizer(init, model_cfg)
    template = init_template(init, cfg.template, "template", tokenizer.config)
    for name in SERVICES:
        key, path = service_checkpoint(cfg, name)
        reader = f"the policy ({init.checkpoint})"
        require_template(path, read_meta(path).metadata, template_record(template), key, reader)
        require_tokenizer(path, tokenizer, key, reader)
    return template


def service_checkpoint(cfg: PPOConfig, name: str) -> tuple[str, Path]:
    """A service's checkpoint key and step folder (a hub model imported into the run once)."""
    key = f"services.{name}.checkpoint"
    return key, resolve_checkpoint(local_checkpoint(getattr(cfg.services, name).checkpoint, cfg.run_dir, key), key)


def module_limits(cfg: PPOConfig, tokenizer, model_cfg) -> dict[str, int]:
    """The longest row each module takes, by its checkpoint's key, as each enforces it
    (ppo_baseline/services.py): the policy's, the reference's and the critic's max_seq_len,
    the reward model's recorded training length (`scoring_setup`)."""
    limits = {POLICY_KEY: model_cfg.max_seq_len}
    for name in SERVICES:
        key, path = service_checkpoint(cfg, name)
        meta = read_meta(path)
        limits[key] = (scoring_setup(meta.metadata, meta.model, tokenizer)[1] if name == "reward"
                       else meta.model.max_seq_len)
    return limits


def prompt_limit(cfg: PPOConfig, limits: dict[str, int], rt: Runtime) -> int:
    """The longest prompt every module takes beside generation.max_new_tokens (a longer
    rollout row would fail that service's call mid-run), at most max_prompt_tokens."""
    key = min(limits, key=limits.get)  # the policy's on a tie: it comes first
    room = limits[key] - cfg.generation.max_new_tokens
    if room < 1:
        raise ConfigError("generation.max_new_tokens", f"{cfg.generation.max_new_tokens} leaves no room for a "
                          f"prompt in the {limits[key]} tokens that {key} takes",
                          f"lower generation.max_new_tokens, or use a {key} with a longer max_seq_len")
    if key != POLICY_KEY and room < cfg.max_prompt_tokens:
        rt.log(f"ppo: prompts are limited to {room} tokens: {key} takes {limits[key]} tokens with "
               f"generation.max_new_tokens={cfg.generation.max_new_tokens}; the policy takes "
               f"{limits[POLICY_KEY]}")
    return min(cfg.max_prompt_tokens, room)


def load_prompts(cfg: PPOConfig, tokenizer, template: ChatTemplate | ChatFormat,
                 limit: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of every prompt in `template` within `limit` tokens (`fit_prompt`: a
    conversation's oldest exchanges go first) and their ids."""
    prompts, _ = read_prompt_mix(cfg.sources, template, cfg.total_prompts, cfg.seed)
    encoded = [fit_prompt(tokenizer, template, p.text, limit, turns=p.turns)[0] for p in prompts]
    return encoded, [p.id for p in prompts]


def resume_point(cfg: PPOConfig, init: InitConfig, rt: Runtime) -> tuple[int, Path | None]:
    """The iteration the run starts at and the actor checkpoint it resumes from (None: a
    fresh start), decided before any weights load or service starts. A resumed run needs
    the critic's checkpoint of the actor's iteration. A fresh start removes the critic's
    checkpoints left by an earlier start: the critic resumes from the step the actor names,
    and pruning keeps the highest steps, so an old run's would outlive this run's."""
    critic = rt.stage_dir / "critic" / "checkpoints"  # where the critic service saves
    latest = latest_checkpoint(rt.stage_dir / "checkpoints")
    if latest is None:
        if rt.is_main and critic.exists():
            rt.log(f"ppo: no actor checkpoint to resume; removing the critic checkpoints in {critic}")
            shutil.rmtree(critic)
        return 0, None
    meta = read_meta(latest)
    check_resumable(meta.metadata.get(CONFIG_KEY), ppo_fingerprint(cfg, init), rt.stage_dir)
    step, over = meta.train_state.step, f"delete {rt.stage_dir} to start this stage over"
    if step > cfg.ppo.iterations:
        raise ResumeRefused("ppo.iterations", f"{cfg.ppo.iterations} is below the {step} iterations that {latest} "
                          "already holds", f"set ppo.iterations={step} to finish with it (or more to continue), "
                          f"or {over}")
    if step < cfg.ppo.iterations and not (critic / step_dir_name(step)).is_dir():
        raise ConfigError("services.critic", f"{critic} holds no critic checkpoint of iteration {step}, which "
                          f"resuming from {latest} needs", over)
    return step, latest


def ppo_fingerprint(cfg: PPOConfig, init: InitConfig) -> dict[str, object]:
    """`resume_fingerprint` plus the steps the policy and each service start from
    (`checkpoint_steps`): a run resumed over an SFT or reward model trained again since
    would go on with a policy, reference and critic grown from the old ones."""
    started = {POLICY_KEY: init.checkpoint} | {key: str(path) for key, path in
                                                (service_checkpoint(cfg, name) for name in SERVICES)}
    return {**resume_fingerprint(cfg), **checkpoint_steps(started)}


@dataclass
class Actor:
    """What the actor trains with (`set_up_actor`): the policy and its tokenizer (`setup`),
    the replica it samples with and one decode session, the prompts' token ids and ids,
    the stop tokens, the optimizer and schedule, and the fingerprint its checkpoints carry."""

    setup: TrainingSetup
    replica: torch.nn.Module
    sampler: DecodeSession
    prompts: list[list[int]]
    prompt_ids: list[int]
    stops: set[int]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_iteration: int
    fingerprint: dict
    latest: Path | None  # the actor checkpoint the run resumes from, checked against `fingerprint`


def run_actor(cfg: PPOConfig, init: InitConfig, rt: Runtime, usage, model_cfg,
              template: ChatTemplate | ChatFormat) -> Path:
    actor = set_up_actor(cfg, init, rt, model_cfg, template)
    model = actor.setup.model
    start, skipped = _resume(actor.setup.checkpoints, model, actor.optimizer, actor.scheduler, rt)
    stream = SampleStream(len(actor.prompts), cfg.seed)
    rt.log(f"ppo: {len(actor.prompts)} prompts, {cfg.ppo.iterations} iterations of {cfg.ppo.rollout_batch} "
           f"responses on {rt.dims.world_size} actor process(es) (TP={rt.dims.tp} x DP={rt.dims.dp}), starting at "
           f"iteration {start}; starting the reward, reference and critic services")
    for note in (cfg.optim.warmup_note(cfg.ppo.optimizer_steps),
                 cfg.services.critic.optim.warmup_note(cfg.ppo.optimizer_steps, "services.critic.")):
        if note is not None:
            rt.log(note)
    log = MetricsLog(rt.stage_dir, cfg.logging, rt.is_main, resumed_step=start, total_steps=cfg.ppo.iterations)
    checkpoint = actor.latest
    # Rank 0 alone starts and calls the services (the TP and DP ranks get its answers).
    # A stop signal (SIGTERM, SIGUSR1: Slurm's warning, Ctrl-C) ends the run after the current
    # iteration, saved, as the training stages do; the services are then shut down.
    with (Services(cfg, rt.stage_dir) if rt.is_main else nullcontext()) as services, \
            ThreadPoolExecutor(3, thread_name_prefix="ppo-call") as pool, stop_requests() as requested:
        if start and services is not None:
            services.call_all({"critic": lambda c: c.call("load", Payload(meta={"step": start}), STEP)}, pool)
        rt.barrier()  # while rank 0 starts the services (minutes, loading three models): no timeout
        for iteration in range(start, cfg.ppo.iterations):
            chosen, streams = rollout_streams(stream, actor.prompt_ids, iteration * cfg.ppo.rollout_batch,
                                              cfg.ppo.rollout_batch)
            refresh(actor.replica, model)
            metrics = iterate(cfg, rt, (model, actor.sampler), actor.optimizer, actor.scheduler, services, pool,
                              (actor.stops, actor.setup.tokenizer.pad_id), [actor.prompts[i] for i in chosen],
                              streams, iteration)
            usage.tokens += int(metrics.pop("tokens"))
            usage.beat()
            skipped = {key: count + int(metrics[key]) for key, count in skipped.items()}
            log.train(iteration + 1, defined(metrics), every=1)
            check_learned(model, skipped, iteration + 1, cfg.ppo, actor.steps_per_iteration, rt)
            final = iteration + 1 == cfg.ppo.iterations
            stopping = not final and any_rank(requested.is_set(), rt.device, rt.group)
            if final or stopping or (iteration + 1) % cfg.save_every == 0:
                checkpoint = save_iteration(cfg, actor, iteration + 1, skipped, model_cfg, template, rt, services,
                                            pool)
                usage.beat(force=True)
            if stopping:
                log.close()
                raise StoppedBySignal.after_saving(iteration + 1, cfg.ppo.iterations, checkpoint, rt)
    log.close()
    return checkpoint


def set_up_actor(cfg: PPOConfig, init: InitConfig, rt: Runtime, model_cfg,
                 template: ChatTemplate | ChatFormat) -> Actor:
    """The policy loaded (from this stage's last checkpoint, else init.checkpoint), its
    sampling replica and decode session, the prompts cut to fit every module, the optimizer
    and schedule; a checkpoint to resume from is checked against this run's fingerprint."""
    setup = prepare_training(init, model_cfg, "lm", rt, cfg.seed)
    model, tokenizer = setup.model, setup.tokenizer
    replica = sampling_model(model, model_cfg, rt)
    # One cache and decode step for every iteration (on CUDA its graphs are captured once); it
    # stays allocated through the policy update too: slots x columns of K/V per layer.
    sampler = DecodeSession(replica, rt.device, cfg.generation)
    limit = prompt_limit(cfg, module_limits(cfg, tokenizer, model_cfg), rt)
    prompts, prompt_ids = load_prompts(cfg, tokenizer, template, limit)
    stops = stop_token_ids(tokenizer, template)
    steps_per_iteration = cfg.ppo.epochs * cfg.ppo.rollout_batch // cfg.ppo.minibatch
    optimizer = build_optimizer(model.parameters(), cfg.optim, rt.device)
    scheduler = build_scheduler(optimizer, cfg.ppo.iterations * steps_per_iteration, cfg.optim)
    # The prompts too: a checkpoint's stream position indexes them (resume_point saw the config only).
    fingerprint = {**ppo_fingerprint(cfg, init), PROMPTS: items_digest(prompts)}
    same_on_every_rank(rt, {"prompts": len(prompts), "sha256": fingerprint[PROMPTS]}, "prompts", "prompts",
                       SAME_INPUTS)  # every rank draws the rollout's rows from them by index
    if (latest := latest_checkpoint(setup.checkpoints)) is not None:
        check_resumable(read_meta(latest).metadata.get(CONFIG_KEY), fingerprint, rt.stage_dir)
    return Actor(setup, replica, sampler, prompts, prompt_ids, stops, optimizer, scheduler, steps_per_iteration,
                 fingerprint, latest)


def save_iteration(cfg: PPOConfig, actor: Actor, step: int, skipped: dict[str, int], model_cfg,
                   template: ChatTemplate | ChatFormat, rt: Runtime, services: Services | None, pool) -> Path:
    """Iteration `step` saved: the critic's checkpoint first (by its service, from rank 0),
    then the actor's, with the skipped-step counts and what a resume checks; returns the
    actor's checkpoint."""
    if services is not None:
        services.call_all({"critic": lambda c: c.call("save", Payload(meta={"step": step}), SAVED)}, pool)
    meta = CheckpointMeta(model_cfg, "lm", TrainState(step=step, data_position=skipped),
                          scheduler=actor.scheduler.state_dict(),
                          metadata={CONFIG_KEY: actor.fingerprint, "alignment": {"method": "ppo"},
                                    TEMPLATE: template_record(template)})
    return save_checkpoint(actor.setup.checkpoints, actor.setup.model, meta, optimizer=actor.optimizer,
                           tokenizer_dir=actor.setup.tokenizer_path, keep_last=cfg.keep_last, group=rt.group)


def _resume(root: Path, model, optimizer, scheduler, rt: Runtime) -> tuple[int, dict[str, int]]:
    """The iteration and the counts of skipped steps (`SKIPPED`) of the actor's last
    checkpoint, loaded (`resume_point` checked it), or 0 and zero counts. A checkpoint
    written before the critic's count was kept resumes it at 0."""
    latest = latest_checkpoint(root)
    if latest is None:
        return 0, dict.fromkeys(SKIPPED, 0)
    meta = load_checkpoint(latest, model, optimizer, restore_rng=True, group=rt.group)
    resume_schedule(scheduler, meta.scheduler)
    rt.log(f"resuming from {latest} (iteration {meta.train_state.step})")
    return meta.train_state.step, {key: int(meta.train_state.data_position.get(key, 0)) for key in SKIPPED}


def check_learned(model, skipped: dict[str, int], done: int, ppo: PPOAlgorithmConfig, steps_per_iteration: int,
                  rt: Runtime) -> None:
    """After each iteration, before its save (the training stages' rule, train/loop.py): a
    skipped step (non-finite loss or gradient norm) leaves the weights as they were, so a run of
    mostly skipped policy steps is the SFT model with a DONE on it, and one of mostly
    skipped critic steps shaped its advantages with an untrained critic's values. `skipped`:
    the running counts (`SKIPPED`), the same on every rank (the critic's is shared by rank 0),
    so every rank fails alike. The final policy weights must be finite (collective)."""
    planned = ppo.iterations * steps_per_iteration  # the critic's too: it steps on the same minibatches
    for key, (module, lr) in SKIPPED.items():
        if skipped[key] > ppo.max_skipped_fraction * planned:
            raise TrainingFailed("ppo.max_skipped_fraction", f"{skipped[key]} of the {done * steps_per_iteration} "
                                 f"{module} steps so far (of {planned} planned) were skipped for a non-finite "
                                 f"loss or gradient norm, more than {ppo.max_skipped_fraction:g} of the run, so the "
                                 f"{module} learned little or nothing; no final checkpoint or DONE was written",
                                 f"lower {lr} or check the rewards (metrics.jsonl: train/{key})")
    if done == ppo.iterations and not weights_finite(model, rt):
        raise TrainingFailed("optim.lr", "the final policy weights hold NaN or Inf (the optimizer diverged); no "
                             "final checkpoint or DONE was written", "lower optim.lr and rerun")


def defined(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics with a finite value: one undefined at this iteration (explained variance
    when the returns do not vary, a gradient norm of skipped steps) is left out of its row,
    since JSON has no NaN (strict parsers reject metrics.jsonl's rows otherwise)."""
    return {key: value for key, value in metrics.items() if math.isfinite(value)}


def iterate(cfg: PPOConfig, rt: Runtime, models: tuple, optimizer, scheduler, services: Services | None, pool,
            tokens: tuple[set[int], int], prompts: list[list[int]], streams: list[int],
            iteration: int) -> dict[str, float]:
    """One PPO iteration; returns its metrics (and `tokens`, generated and trained on).
    `models`: the training model and the decode session of the model sampling with its
    weights (often the same model);
    `services`: rank 0's, None on the other ranks; `tokens`: the ids that end an answer, the pad id;
    `streams`: each row's sampling stream (`rollout_streams`)."""
    model, sampler = models
    began = time.perf_counter()
    stops, pad_id = tokens
    rollout = sample(sampler, prompts, streams, iteration_generation(cfg.generation, iteration), stops, pad_id, rt)
    old_logp = policy_logprobs(model, rollout, rt, cfg.ppo.micro_batch)
    generated = time.perf_counter()
    answer = ask_services(services, pool, rollout.sequences(), rt, iteration)
    scored = time.perf_counter()
    scores, values = answer["scores"], answer["values"]
    shaped = advantages(old_logp, answer["ref_logp"], values, scores, rollout.mask, cfg.ppo)
    critic, value_loss, critic_skipped = None, float("nan"), None  # only rank 0 logs the critic's loss
    if services is not None:  # the critic trains on the same rollout meanwhile
        critic_batch = Payload({**rollout.sequences(), "returns": shaped.returns, "old_values": values},
                               {"step": iteration})
        critic = pool.submit(lambda: services.processes["critic"].client.call("train", critic_batch, TRAINED))
    lr = scheduler.get_last_lr()[0]
    policy = update_policy(model, optimizer, scheduler,
                           {**rollout.sequences(), "old_logp": old_logp, "advantages": shaped.advantages},
                           cfg.ppo, cfg.seed, iteration, cfg.optim.grad_clip, rt)
    if critic is not None:  # a non-finite value loss was answered with 500, which stopped the run
        trained = services.results({"critic": critic})["critic"].meta
        value_loss, critic_skipped = trained["value_loss"], trained["critic_skipped_steps"]
    critic_skipped = count_from_main(critic_skipped, rt)  # every rank fails alike on too many (check_learned)
    done = time.perf_counter()
    mask = rollout.mask
    response_tokens = int(mask.sum())
    return {"reward_mean": float(scores.mean()), "reward_raw_mean": float(answer["raw"].mean()),
            "kl": float(shaped.kl.sum() / len(prompts)), "loss": policy["loss"], "approx_kl": policy["approx_kl"],
            "clip_frac": policy["clip_frac"], "entropy": policy["entropy"],
            "grad_norm": policy.get("grad_norm", math.nan),  # absent when every step was skipped
            "skipped_steps": policy["skipped_steps"], "value_loss": value_loss, "critic_skipped_steps": critic_skipped,
            "explained_variance": float(algorithm.explained_variance(values, shaped.returns, mask)),
            "response_length": response_tokens / len(prompts), "finished": float(rollout.finished.float().mean()),
            "tokens_per_s": response_tokens / max(generated - began, 1e-9), "lr": lr,
            "time_generate": generated - began, "time_services": scored - generated, "time_train": done - scored,
            "iteration_seconds": done - began, "tokens": float(rollout.lengths.sum() * (1 + cfg.ppo.epochs))}


def ask_services(services: Services | None, pool, sequences: dict[str, torch.Tensor],
                 rt: Runtime, iteration: int) -> dict[str, torch.Tensor]:
    """Rewards (normalized and raw), reference log-probs and values of the rollout, asked
    for by rank 0 (`services`; None on the other ranks) and shared with every rank, which
    all fail alike on a non-finite number (it would spoil every advantage)."""
    rows, width = sequences["tokens"].shape
    shapes = {"scores": (rows,), "raw": (rows,), "ref_logp": (rows, width), "values": (rows, width)}
    answer = None
    if services is not None:
        payload = Payload(sequences)
        got = services.call_all({"reward": lambda c: c.call("score", payload, SCORES),
                                 "reference": lambda c: c.call("logprobs", payload, LOGPROBS),
                                 "critic": lambda c: c.call("values", payload, VALUES)}, pool)
        answer = {"scores": got["reward"].tensors["rewards"], "raw": got["reward"].tensors["raw"],
                  "ref_logp": got["reference"].tensors["logprobs"], "values": got["critic"].tensors["values"]}
    answer = from_main(answer, shapes, rt)
    check_answers(answer, iteration)
    return answer


def check_answers(answer: dict[str, torch.Tensor], iteration: int) -> None:
    """The services' answers must be finite; one NaN reward would spoil every whitened
    advantage and skip every policy step (the services refuse to send them too)."""
    for key, tensor in answer.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            name, what = ANSWERS[key]
            raise ConfigError(f"services.{name}.checkpoint", f"the {name} service answered {bad} non-finite "
                              f"{what} (of {tensor.numel()}) at iteration {iteration + 1}; no DONE was written",
                              "check that checkpoint (a reward model's reward_stats must be finite)")


def count_from_main(count: float | None, rt: Runtime) -> float:
    """Rank 0's `count` (a service's answer; None on the other ranks) on every rank (`from_main`)."""
    return from_main(None if count is None else {"count": torch.tensor([float(count)])}, {"count": (1,)},
                     rt)["count"].item()


def from_main(tensors: dict[str, torch.Tensor] | None, shapes: dict[str, tuple[int, ...]],
              rt: Runtime) -> dict[str, torch.Tensor]:
    """Rank 0's float32 `tensors` (of `shapes`; None elsewhere) on every rank: one broadcast,
    on the group without a timeout (`Runtime.wait_group`): the others wait here while rank 0
    waits for the services (up to `services.request_timeout_s`, which may exceed it)."""
    if rt.group is None:
        return tensors
    sizes = [math.prod(shape) for shape in shapes.values()]
    device = collective_device(rt.wait_group, rt.device)
    flat = (torch.cat([tensors[key].float().flatten() for key in shapes]) if tensors is not None
            else torch.empty(sum(sizes))).to(device)
    dist.broadcast(flat, src=0, group=rt.wait_group)
    return {key: part.view(shape) for (key, shape), part in zip(shapes.items(), flat.cpu().split(sizes))}
