"""`orlhf smoke`: the foundation end to end on synthetic data.

Builds the model on the meta device, parallelizes it (e.g. TP=2 on two CPU processes),
trains a few AdamW steps on a learnable synthetic sequence, saves a sharded checkpoint,
loads it into a freshly built model and checks the logits are identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from offline_rlhf.config.tools import SmokeConfig
from offline_rlhf.fsutil import write_jsonl
from offline_rlhf.parallel.grad import clip_grad_norm_, sum_head_norm_grads
from offline_rlhf.parallel.parallelize import build_model, loss_context
from offline_rlhf.runtime import Runtime, stage_runtime
from offline_rlhf.stage_support import mark_done


def synthetic_batch(cfg: SmokeConfig, step: int) -> torch.Tensor:
    """Arithmetic sequences with random starts and strides: predictable after two tokens."""
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + step)
    start = torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, 1), generator=gen)
    stride = torch.randint(1, 4, (cfg.batch_size, 1), generator=gen)
    return (start + stride * torch.arange(cfg.seq_len + 1)) % cfg.model.vocab_size


def train(cfg: SmokeConfig, rt: Runtime, model, optimizer) -> list[dict]:
    history = []
    for step in range(1, cfg.steps + 1):
        tokens = synthetic_batch(cfg, step).to(rt.device)
        optimizer.zero_grad(set_to_none=True)
        with loss_context(rt.dims):
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
        sum_head_norm_grads(model)
        grad_norm = clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        record = {"step": step, "loss": _scalar(loss), "grad_norm": float(grad_norm)}
        history.append(record)
        rt.log(f"step {step}/{cfg.steps}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}")
    return history


def _scalar(value) -> float:
    return float(_full(value.detach()))


def _full(logits: torch.Tensor) -> torch.Tensor:
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def main(cfg: SmokeConfig) -> int:
    with stage_runtime("smoke", cfg.run_dir, cfg.parallel, cfg.model, cfg) as (rt, usage):
        rt.log(f"smoke: {cfg.model.num_params():,} parameters, tp={rt.dims.tp} dp={rt.dims.dp} on {rt.device}")
        model = build_model(cfg.model, "lm", rt.dims, rt.mesh, rt.device, seed=cfg.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        history = train(cfg, rt, model, optimizer)
        usage.tokens = cfg.steps * cfg.batch_size * cfg.seq_len * rt.dims.dp
        meta = CheckpointMeta(model=cfg.model, head="lm",
                              train_state=TrainState(step=cfg.steps, tokens_seen=usage.tokens))
        saved = save_checkpoint(rt.stage_dir / "checkpoints", model, meta, optimizer=optimizer, group=rt.group)
        probe = synthetic_batch(cfg, 0)[:, :-1].to(rt.device)
        with torch.no_grad():
            expected = _full(model(probe))
            reloaded = build_model(cfg.model, "lm", rt.dims, rt.mesh, rt.device)
            load_checkpoint(latest_checkpoint(rt.stage_dir / "checkpoints"), reloaded, group=rt.group)
            diff = (_full(reloaded(probe)) - expected).abs().max().item()
        if rt.is_main:
            write_jsonl(rt.stage_dir / "metrics.jsonl", history)
        rt.log(f"saved {saved}; reloaded into a fresh model: max |logit difference| = {diff:.3g}")
        if diff != 0.0:
            raise RuntimeError(f"reloaded checkpoint {saved} gives different logits (max difference {diff})")
        if rt.is_main:
            mark_done(rt, saved)
    return 0
