"""The actor's side of one PPO iteration: sample a rollout, shape its rewards, estimate
advantages, and update the policy with the clipped surrogate (paper Sec. 4, Eq. 3).

Everything random is keyed by (seed, iteration): the prompts of iteration i are positions
[i R, (i + 1) R) of an endless stream of seeded permutations (one per epoch), a row's
sampling stream is (prompt id, epoch of its position) under a generation seed derived
from i (`rollout_streams`), and minibatch orders are seeded by (seed, i, epoch). A resumed
run therefore repeats exactly what the killed one did.

Over a world of processes (DP x TP, the training stages' layout): each data-parallel
replica samples its block of the prompts with an inference copy of the policy (TP only,
refreshed from the trained weights each iteration), the blocks are gathered so that every
rank holds the whole rollout in prompt order, the old log-probs are computed row-split over
the DP ranks and gathered, and each minibatch step is split over the DP ranks. Advantages
(and their whitening) are computed on the whole rollout on every rank, so any layout makes
the update one process makes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from offline_rlhf.config.schema import GenerationConfig, ModelConfig
from offline_rlhf.generation.engine import DecodeSession, Request, run
from offline_rlhf.generation.sampling import MASK32, stream_id
from offline_rlhf.generation.shards import my_share
from offline_rlhf.parallel.state_dict import copy_parameters
from offline_rlhf.runtime import Runtime
from offline_rlhf.stage_support import decode_dtype, empty_inference_model
from offline_rlhf.train.loop import SampleStream, Task
from ppo_baseline import algorithm
from ppo_baseline.config import PPOAlgorithmConfig
from ppo_baseline.models import action_scores, response_logprobs, train_epochs


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


def rollout_streams(stream: SampleStream, prompt_ids: list[int], start: int,
                    count: int) -> tuple[list[int], list[int]]:
    """The prompts at positions [start, start + count) of the prompt stream (indices) and
    each row's sampling stream: (prompt id, the epoch of its position). Every epoch draws a
    prompt once, so a prompt drawn twice in one rollout (more rows than prompts, or a
    rollout across an epoch's end) samples two independent responses; the key is the row's
    place in the global stream, not in a replica's share or a resumed run's batch."""
    chosen = stream.take(start, count)
    return chosen, [stream_id(prompt_ids[i], (start + k) // stream.size) for k, i in enumerate(chosen)]


def sampling_model(model: nn.Module, model_cfg: ModelConfig, rt: Runtime) -> nn.Module:
    """What the actor samples with: on CPU without data parallelism, the training model
    itself; else an inference replica in the runtime's TP layout (`orlhf generate`'s), so
    that replicas decode independently (FSDP would make every replica run the same number
    of forwards), in bf16 on CUDA (half the bytes per decoded token; the fp32 training
    weights would be cast on every step of a CUDA graph). Uninitialized: `refresh` fills it
    before the first sample, and keeps it current."""
    if rt.dims.dp == 1 and rt.device.type != "cuda":
        return model
    return empty_inference_model(model_cfg, "lm", rt, decode_dtype(rt.device))


def refresh(replica: nn.Module, model: nn.Module) -> None:
    """The trained weights into the sampling replica (collective over the world)."""
    if replica is not model:
        copy_parameters(model, replica)


@torch.no_grad()
def sample(sampler: DecodeSession, prompts: list[list[int]], streams: list[int], gen: GenerationConfig,
           stop_ids: int | set[int], pad_id: int, rt: Runtime) -> Rollout:
    """One sampled response per prompt with the generation engine and the weights of the
    sampler's model (its cache and decode step, CUDA graphs included, serve every iteration).
    Each data-parallel replica answers its block of the prompts (the TP ranks of a replica
    together); every rank gets the whole rollout in prompt order. Row i samples with the
    stream `streams[i]` (`rollout_streams`): the rows do not depend on how many replicas
    there are."""
    mine, _ = my_share(rt, list(range(len(prompts))))
    sampler.model.eval()
    requests = [Request(prompts[i], streams[i], gen.max_new_tokens) for i in mine]
    completions = run(sampler.model, requests, gen, stop_ids, pad_id, rt.device, session=sampler)
    sampler.model.train()
    rows = [prompts[i] + c.tokens for i, c in zip(mine, completions)]
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for index, (row, i) in enumerate(zip(rows, mine)):
        tokens[index, :len(row)] = torch.tensor(row)
        mask[index, len(prompts[i]):len(row)] = True
    local = Rollout(tokens, mask, torch.tensor([len(r) for r in rows]),
                    torch.tensor([c.finish == "eos" for c in completions]))
    return gather_rollout(local, rt, pad_id)


def gather_rollout(local: Rollout, rt: Runtime, pad_id: int) -> Rollout:
    """The DP replicas' blocks (equal row counts) as one rollout, in replica order (= prompt
    order, `my_share`'s contiguous blocks), right-padded to the widest row: one all-gather."""
    if rt.dims.dp == 1:
        return local
    group = rt.mesh.get_group("dp")
    width = torch.tensor([local.tokens.shape[1]], device=rt.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
    width, extra = int(width), int(width) - local.tokens.shape[1]
    packed = torch.cat([F.pad(local.tokens, (0, extra), value=pad_id), F.pad(local.mask.long(), (0, extra)),
                        local.lengths[:, None], local.finished.long()[:, None]], dim=1).to(rt.device)
    shares = [torch.empty_like(packed) for _ in range(rt.dims.dp)]
    dist.all_gather(shares, packed, group=group)
    rows = torch.cat(shares).cpu()
    return Rollout(rows[:, :width], rows[:, width:2 * width].bool(), rows[:, 2 * width], rows[:, 2 * width + 1].bool())


def policy_logprobs(model: nn.Module, rollout: Rollout, rt: Runtime, batch_size: int) -> torch.Tensor:
    """[B, T] log pi_old of the response tokens under the weights that sampled them, the
    rows split over the DP ranks and gathered (every rank gets all of them)."""
    return response_logprobs(model, rollout.sequences(), rt, batch_size)


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
        logp, entropy = action_scores(model, batch["tokens"], batch["mask"], entropy=True)
        return algorithm.policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"], normalizer, clip,
                                     entropy=entropy)
    return Task(loss=loss, normalizer=lambda b: float(b["mask"].sum()), tokens=lambda b: int(b["lengths"].sum()))


def update_policy(model: nn.Module, optimizer, scheduler, data: dict[str, torch.Tensor], cfg: PPOAlgorithmConfig,
                  seed: int, iteration: int, grad_clip: float, rt: Runtime) -> dict[str, float]:
    """`cfg.epochs` passes of minibatch steps over the whole rollout `data` (every rank
    holds it; each DP rank trains on its share of every minibatch); metrics averaged over steps."""
    return train_epochs(policy_task(cfg.clip), model, optimizer, scheduler, data, cfg, seed, iteration, grad_clip, rt)
