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
Outputs in R/ppo/: checkpoints/, metrics.jsonl, critic/checkpoints/, <service>/service.log,
DONE naming the final actor checkpoint (an `lm` checkpoint with its tokenizer and template).
"""

from __future__ import annotations

import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import replace
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
)
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import InitConfig
from offline_rlhf.data.chat_template import ChatFormat, template_record
from offline_rlhf.data.prompts import read_prompt_mix
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import fit_prompt, stop_token_ids
from offline_rlhf.generation.engine import DecodeSession
from offline_rlhf.host import DONE
from offline_rlhf.runtime import Runtime, stage_runtime
from offline_rlhf.stage_support import (
    check_resumable,
    init_template,
    load_tokenizer,
    local_checkpoint,
    local_init,
    mark_done,
    require_template,
    require_tokenizer,
    resume_fingerprint,
)
from offline_rlhf.train.init import prepare_training
from offline_rlhf.train.loop import SampleStream
from offline_rlhf.train.metrics_log import MetricsLog
from offline_rlhf.train.schedule import build_optimizer, build_scheduler
from ppo_baseline import algorithm
from ppo_baseline.actor import (
    advantages,
    iteration_generation,
    policy_logprobs,
    refresh,
    sample,
    sampling_model,
    update_policy,
)
from ppo_baseline.config import SERVICES, PPOConfig
from ppo_baseline.launch import Services
from ppo_baseline.models import LOGPROBS, SAVED, SCORES, STEP, TRAINED, VALUES
from ppo_baseline.serve import serve_in_job
from ppo_baseline.wire import Payload

STAGE = "ppo_actor"
OUT = "ppo"


def main(cfg: PPOConfig) -> int:
    if cfg.serve:  # a service's job step of the Slurm heterogeneous job
        return serve_in_job(cfg)
    init = local_init(cfg.init, cfg.run_dir)  # a Hugging Face model is imported once, into the run
    model_cfg = read_meta(resolve_checkpoint(init.checkpoint, "init.checkpoint")).model
    template = policy_template(cfg, init, model_cfg)  # checked before any weights load
    previous = signal.signal(signal.SIGTERM, _raise_exit)  # a SIGTERM still shuts the services down
    try:
        with stage_runtime(STAGE, cfg.run_dir, cfg.parallel, model_cfg, cfg) as (rt, usage):
            cfg.check_world(rt.dims.dp)
            rt = replace(rt, stage_dir=Path(cfg.run_dir) / OUT)
            if rt.is_main:
                rt.stage_dir.mkdir(parents=True, exist_ok=True)
                (rt.stage_dir / DONE).unlink(missing_ok=True)
            final = run_actor(cfg, init, rt, usage, model_cfg, template)
            mark_done(rt, final)
            rt.log(f"ppo done: {cfg.ppo.iterations} iterations, final actor checkpoint {final}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def policy_template(cfg: PPOConfig, init: InitConfig, model_cfg) -> ChatTemplate | ChatFormat:
    """The template the policy is prompted with: the one `init.checkpoint` was trained
    with (`init_template`). The reward model, the critic and the reference read the policy's
    token ids, so each must have been trained with it and the policy's tokenizer too."""
    tokenizer, _ = load_tokenizer(init, model_cfg)
    template = init_template(init, cfg.template, "template", tokenizer.config)
    for name in SERVICES:
        key = f"services.{name}.checkpoint"
        path = resolve_checkpoint(local_checkpoint(getattr(cfg.services, name).checkpoint, cfg.run_dir, key), key)
        reader = f"the policy ({init.checkpoint})"
        require_template(path, read_meta(path).metadata, template_record(template), key, reader)
        require_tokenizer(path, tokenizer, key, reader)
    return template


def load_prompts(cfg: PPOConfig, tokenizer, template: ChatTemplate | ChatFormat,
                 model_cfg) -> tuple[list[list[int]], list[int]]:
    """Token ids of every prompt in `template` within `limit` tokens (`fit_prompt`: a
    conversation's oldest exchanges go first) and their ids."""
    prompts, _ = read_prompt_mix(cfg.sources, template, cfg.total_prompts, cfg.seed)
    limit = min(cfg.max_prompt_tokens, model_cfg.max_seq_len - cfg.generation.max_new_tokens)
    if limit < 1:
        raise ConfigError("generation.max_new_tokens", f"leaves no room for a prompt in max_seq_len="
                          f"{model_cfg.max_seq_len}", "lower it")
    encoded = [fit_prompt(tokenizer, template, p.text, limit, turns=p.turns)[0] for p in prompts]
    return encoded, [p.id for p in prompts]


def run_actor(cfg: PPOConfig, init: InitConfig, rt: Runtime, usage, model_cfg,
              template: ChatTemplate | ChatFormat) -> Path:
    setup = prepare_training(init, model_cfg, "lm", rt, cfg.seed)
    model, tokenizer = setup.model, setup.tokenizer
    replica = sampling_model(model, model_cfg, rt)
    # One cache and decode step for every iteration (on CUDA its graphs are captured once); it
    # stays allocated through the policy update too: slots x columns of K/V per layer.
    sampler = DecodeSession(replica, rt.device, cfg.generation)
    prompts, prompt_ids = load_prompts(cfg, tokenizer, template, model_cfg)
    stops = stop_token_ids(tokenizer, template)
    steps_per_iteration = cfg.ppo.epochs * cfg.ppo.rollout_batch // cfg.ppo.minibatch
    optimizer = build_optimizer(model.parameters(), cfg.optim, rt.device)
    scheduler = build_scheduler(optimizer, cfg.ppo.iterations * steps_per_iteration, cfg.optim)
    fingerprint = resume_fingerprint(cfg)
    start = _resume(setup.checkpoints, model, optimizer, scheduler, fingerprint, rt)
    stream = SampleStream(len(prompts), cfg.seed)
    log = MetricsLog(rt.stage_dir, cfg.logging, rt.is_main, resumed_step=start, total_steps=cfg.ppo.iterations)
    rt.log(f"ppo: {len(prompts)} prompts, {cfg.ppo.iterations} iterations of {cfg.ppo.rollout_batch} responses "
           f"on {rt.dims.world_size} actor process(es) (TP={rt.dims.tp} x DP={rt.dims.dp}), starting at iteration "
           f"{start}; starting the reward, reference and critic services")
    checkpoint = latest_checkpoint(setup.checkpoints)
    # Rank 0 alone starts and calls the services (the TP and DP ranks get its answers).
    with (Services(cfg, rt.stage_dir) if rt.is_main else nullcontext()) as services, \
            ThreadPoolExecutor(3, thread_name_prefix="ppo-call") as pool:
        if start and services is not None:
            services.call_all({"critic": lambda c: c.call("load", Payload(meta={"step": start}), STEP)}, pool)
        for iteration in range(start, cfg.ppo.iterations):
            chosen = stream.take(iteration * cfg.ppo.rollout_batch, cfg.ppo.rollout_batch)
            refresh(replica, model)
            metrics = iterate(cfg, rt, (model, sampler), optimizer, scheduler, services, pool,
                              (stops, tokenizer.pad_id), [prompts[i] for i in chosen],
                              [prompt_ids[i] for i in chosen], iteration)
            usage.tokens += int(metrics.pop("tokens"))
            usage.beat()
            log.train(iteration + 1, metrics, every=1)
            if iteration + 1 == cfg.ppo.iterations or (iteration + 1) % cfg.save_every == 0:
                if services is not None:
                    services.call_all({"critic": lambda c, s=iteration + 1: c.call(
                        "save", Payload(meta={"step": s}), SAVED)}, pool)
                checkpoint = save_checkpoint(
                    setup.checkpoints, model,
                    CheckpointMeta(model_cfg, "lm", TrainState(step=iteration + 1), scheduler=scheduler.state_dict(),
                                   metadata={CONFIG_KEY: fingerprint, "alignment": {"method": "ppo"},
                                             TEMPLATE: template_record(template)}),
                    optimizer=optimizer, tokenizer_dir=setup.tokenizer_path, keep_last=cfg.keep_last, group=rt.group)
                usage.beat(force=True)
    log.close()
    return checkpoint


def _resume(root: Path, model, optimizer, scheduler, fingerprint: dict, rt: Runtime) -> int:
    latest = latest_checkpoint(root)
    if latest is None:
        return 0
    check_resumable(read_meta(latest).metadata.get(CONFIG_KEY), fingerprint, root)
    meta = load_checkpoint(latest, model, optimizer, restore_rng=True, group=rt.group)
    scheduler.load_state_dict(meta.scheduler)
    rt.log(f"resuming from {latest} (iteration {meta.train_state.step})")
    return meta.train_state.step


def iterate(cfg: PPOConfig, rt: Runtime, models: tuple, optimizer, scheduler, services: Services | None, pool,
            tokens: tuple[set[int], int], prompts: list[list[int]], prompt_ids: list[int],
            iteration: int) -> dict[str, float]:
    """One PPO iteration; returns its metrics (and `tokens`, generated and trained on).
    `models`: the training model and the decode session of the model sampling with its
    weights (often the same model);
    `services`: rank 0's, None on the other ranks; `tokens`: the ids that end an answer, the pad id."""
    model, sampler = models
    began = time.perf_counter()
    stops, pad_id = tokens
    rollout = sample(sampler, prompts, prompt_ids, iteration_generation(cfg.generation, iteration), stops, pad_id, rt)
    old_logp = policy_logprobs(model, rollout, rt, cfg.ppo.micro_batch)
    generated = time.perf_counter()
    answer = ask_services(services, pool, rollout.sequences(), rt)
    scored = time.perf_counter()
    scores, values = answer["scores"], answer["values"]
    shaped = advantages(old_logp, answer["ref_logp"], values, scores, rollout.mask, cfg.ppo)
    critic, value_loss = None, float("nan")  # only rank 0 logs metrics: the others need no critic loss
    if services is not None:  # the critic trains on the same rollout meanwhile
        critic_batch = Payload({**rollout.sequences(), "returns": shaped.returns, "old_values": values},
                               {"step": iteration})
        critic = pool.submit(lambda: services.processes["critic"].client.call("train", critic_batch, TRAINED))
    lr = scheduler.get_last_lr()[0]
    policy = update_policy(model, optimizer, scheduler,
                           {**rollout.sequences(), "old_logp": old_logp, "advantages": shaped.advantages},
                           cfg.ppo, cfg.seed, iteration, cfg.optim.grad_clip, rt)
    if critic is not None:
        value_loss = services.results({"critic": critic})["critic"].meta["value_loss"]
    done = time.perf_counter()
    mask = rollout.mask
    response_tokens = int(mask.sum())
    return {"reward_mean": float(scores.mean()), "reward_raw_mean": float(answer["raw"].mean()),
            "kl": float(shaped.kl.sum() / len(prompts)), "loss": policy["loss"], "approx_kl": policy["approx_kl"],
            "clip_frac": policy["clip_frac"], "entropy": policy["entropy"], "grad_norm": policy["grad_norm"],
            "value_loss": value_loss,
            "explained_variance": float(algorithm.explained_variance(values, shaped.returns, mask)),
            "response_length": response_tokens / len(prompts), "finished": float(rollout.finished.float().mean()),
            "tokens_per_s": response_tokens / max(generated - began, 1e-9), "lr": lr,
            "time_generate": generated - began, "time_services": scored - generated, "time_train": done - scored,
            "iteration_seconds": done - began, "tokens": float(rollout.lengths.sum() * (1 + cfg.ppo.epochs))}


def ask_services(services: Services | None, pool, sequences: dict[str, torch.Tensor],
                 rt: Runtime) -> dict[str, torch.Tensor]:
    """Rewards (normalized and raw), reference log-probs and values of the rollout, asked
    for by rank 0 (`services`; None on the other ranks) and shared with every rank."""
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
    return from_main(answer, shapes, rt)


def from_main(tensors: dict[str, torch.Tensor] | None, shapes: dict[str, tuple[int, ...]],
              rt: Runtime) -> dict[str, torch.Tensor]:
    """Rank 0's float32 `tensors` (of `shapes`; None elsewhere) on every rank: one broadcast."""
    if rt.group is None:
        return tensors
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = (torch.cat([tensors[key].float().flatten() for key in shapes]) if tensors is not None
            else torch.empty(sum(sizes))).to(rt.device)
    dist.broadcast(flat, src=0, group=rt.group)
    return {key: part.view(shape) for (key, shape), part in zip(shapes.items(), flat.cpu().split(sizes))}
