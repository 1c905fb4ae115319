"""The actor's side of one PPO iteration: sample a rollout, shape its rewards, estimate
advantages, and update the policy with the clipped surrogate (paper Sec. 4, Eq. 3).

Everything random is keyed by (seed, iteration): the prompts of iteration i are positions
[i R, (i + 1) R) of an endless stream of seeded permutations, a response's sampling stream
is (prompt id, 0) under a generation seed derived from i, and minibatch orders are seeded
by (seed, i, epoch). A resumed run therefore repeats exactly what the killed one did.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.generation.engine import Request, run
from offline_rlhf.generation.sampling import MASK32, stream_id
from offline_rlhf.runtime import Runtime, autocast_for
from offline_rlhf.train.loop import Task, train_step
from ppo_baseline import algorithm
from ppo_baseline.config import PPOAlgorithmConfig
from ppo_baseline.models import sequence_logprobs, token_entropy


@dataclass
class Rollout:
    """One iteration's responses as right-padded rows `prompt + response` (models.py)."""

    tokens: torch.Tensor  # [B, T] int64
    mask: torch.Tensor  # [B, T] bool, response tokens
    lengths: torch.Tensor  # [B] int64
    finished: torch.Tensor  # [B] bool: ended with EOS

    def sequences(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens, "mask": self.mask, "lengths": self.lengths}


def iteration_generation(cfg: GenerationConfig, iteration: int) -> GenerationConfig:
    """The sampling config of iteration `iteration`: its own seed, so iterations differ."""
    return replace(cfg, seed=(cfg.seed * 1_000_003 + iteration) & MASK32)


def generator(seed: int, iteration: int, epoch: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration * 1_009 + epoch)


@torch.no_grad()
def sample(model: nn.Module, prompts: list[list[int]], prompt_ids: list[int], gen: GenerationConfig, eos_id: int,
           pad_id: int, rt: Runtime) -> Rollout:
    """One sampled response per prompt with the generation engine and the current weights."""
    model.eval()
    requests = [Request(ids, stream_id(pid, 0), gen.max_new_tokens) for ids, pid in zip(prompts, prompt_ids)]
    completions = run(model, requests, gen, eos_id, pad_id, rt.device)
    model.train()
    rows = [ids + c.tokens for ids, c in zip(prompts, completions)]
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for index, (row, ids) in enumerate(zip(rows, prompts)):
        tokens[index, :len(row)] = torch.tensor(row)
        mask[index, len(ids):len(row)] = True
    return Rollout(tokens, mask, torch.tensor([len(r) for r in rows]),
                   torch.tensor([c.finish == "eos" for c in completions]))


@torch.no_grad()
def policy_logprobs(model: nn.Module, rollout: Rollout, rt: Runtime, batch_size: int) -> torch.Tensor:
    """[B, T] log pi_old of the response tokens under the weights that sampled them."""
    out = []
    for start in range(0, rollout.tokens.shape[0], batch_size):
        tokens = rollout.tokens[start:start + batch_size].to(rt.device)
        mask = rollout.mask[start:start + batch_size].to(rt.device)
        with autocast_for(rt.device):
            out.append(sequence_logprobs(model(tokens), tokens, mask).cpu())
    return torch.cat(out)


@dataclass
class Advantages:
    rewards: torch.Tensor  # [B, T] KL-shaped per-token rewards
    kl: torch.Tensor  # [B, T] log pi_old - log pi_ref
    advantages: torch.Tensor  # [B, T] (whitened when configured)
    returns: torch.Tensor  # [B, T]


def advantages(old_logp: torch.Tensor, ref_logp: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
               mask: torch.Tensor, cfg: PPOAlgorithmConfig) -> Advantages:
    """Eq. 3's KL-shaped rewards, GAE, and (optionally) whitened advantages."""
    rewards, kl = algorithm.kl_penalized_rewards(old_logp, ref_logp, scores, mask, cfg.kl_coef)
    adv, returns = algorithm.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = algorithm.whiten(adv, mask)
    return Advantages(rewards, kl, adv, returns)


def policy_task(clip: float) -> Task:
    """The actor's loss for the generic train step: the clipped surrogate over response
    tokens, normalized by the minibatch's response tokens; entropy as a metric."""
    def loss(model, batch, normalizer):
        logits = model(batch["tokens"])
        logp = sequence_logprobs(logits, batch["tokens"], batch["mask"])
        entropy = token_entropy(logits.detach(), batch["mask"])
        return algorithm.policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"], normalizer, clip,
                                     entropy=entropy)
    return Task(loss=loss, normalizer=lambda b: float(b["mask"].sum()), tokens=lambda b: int(b["lengths"].sum()))


def update_policy(model: nn.Module, optimizer, scheduler, data: dict[str, torch.Tensor], cfg: PPOAlgorithmConfig,
                  seed: int, iteration: int, grad_clip: float, rt: Runtime) -> dict[str, float]:
    """`cfg.epochs` passes of minibatch steps over the rollout; metrics averaged over steps."""
    rows = data["tokens"].shape[0]
    task = policy_task(cfg.clip)
    sums: dict[str, float] = {}
    steps = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(rows, generator=generator(seed, iteration, epoch))
        for start in range(0, rows, cfg.minibatch):
            chosen = order[start:start + cfg.minibatch]
            batches = [{key: value[chosen[at:at + cfg.micro_batch]] for key, value in data.items()}
                       for at in range(0, cfg.minibatch, cfg.micro_batch)]
            metrics, _ = train_step(task, model, optimizer, batches, rt, grad_clip)
            scheduler.step()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            steps += 1
    return {key: value / steps for key, value in sums.items()}
