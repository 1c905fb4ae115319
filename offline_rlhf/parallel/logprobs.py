"""Per-token NLL from logits in any tensor-parallel layout, as plain local tensors."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from offline_rlhf.data.tokenize import IGNORE_INDEX
from offline_rlhf.losses.logprobs import shifted_token_nll

# Logits (tokens x vocabulary) that exist at once in `head_token_nll`: 2**27 fp32 values
# are 0.5 GiB, 1,046 tokens of Llama 3's 128,256-token vocabulary. The whole [B, T, V] of
# one micro-batch of 8 x 4,096 tokens would be 16 GiB in fp32, kept for the backward.
LOGITS_PER_CHUNK = 2**27


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`shifted_token_nll` for the losses: (nll [B, T-1], mask [B, T-1]). Under loss-parallel
    TP the logits are a vocabulary-sharded DTensor (inside `loss_context`) and the per-token
    losses come back replicated; the losses take their local copy."""
    nll, mask = shifted_token_nll(logits, labels)
    return (nll.to_local() if isinstance(nll, DTensor) else nll), mask


def model_token_nll(model: nn.Module, batch: dict[str, torch.Tensor], attn_mask=None,
                    chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_nll` of `batch["labels"]` under the LM `model` run on the batch's tokens and
    positions, without its [B, T, V] logits (`head_token_nll`)."""
    head = partial(head_token_nll, labels=batch["labels"], chunk_tokens=chunk_tokens)
    return model(batch["tokens"], positions=batch["positions"], attn_mask=attn_mask, head_fn=head)


def head_token_nll(hidden: torch.Tensor, output: nn.Linear, labels: torch.Tensor,
                   chunk_tokens: int | None = None, entropy: bool = False) -> tuple[torch.Tensor, ...]:
    """`token_nll` from the final hidden states [B, T, D] and the LM head: logits only at the
    positions that score a label (not at prompts or padding), row by row, `chunk_tokens`
    positions at a time (default: `LOGITS_PER_CHUNK` logits), and when the batch has more
    than one chunk, each chunk's recomputed in the backward instead of kept. Row by row, a
    row's values do not depend on the rows batched with it (a matmul's rounding can depend
    on its row count), so a resumed pass scores as an uninterrupted one. A tensor-parallel
    head keeps its plan's logits (sharded under loss parallelism, so 1/tp of them a rank).
    With `entropy`, a third [B, T-1] tensor: the entropy of the distribution each scored
    label is drawn from, 0 elsewhere (a metric, without gradient; from whole logits, not
    vocabulary-sharded ones)."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    rows, columns = mask.nonzero(as_tuple=True)  # row-major: each row's scored labels together
    if isinstance(output.weight, DTensor) or len(rows) == 0:  # no label: a loss of 0 that still has a graph
        logits = output(hidden)
        nll, mask = token_nll(logits, labels)
        return (nll, mask, _logits_entropy(logits.detach(), mask)) if entropy else (nll, mask)
    chunk = chunk_tokens or max(1, LOGITS_PER_CHUNK // output.weight.shape[0])
    states, wanted = hidden[:, :-1][rows, columns], target[rows, columns]
    per_row = mask.sum(dim=1).tolist()  # on CUDA, this and nonzero are the host syncs
    pieces = [(row_states[start:start + chunk], row_wanted[start:start + chunk])
              for row_states, row_wanted in zip(states.split(per_row), wanted.split(per_row))
              for start in range(0, len(row_wanted), chunk)]
    score = partial(_chunk_scores, entropy=entropy)
    run = score if len(rows) <= chunk else partial(checkpoint, score, use_reentrant=False)
    nll, *metrics = torch.cat([run(piece, output.weight, piece_wanted) for piece, piece_wanted in pieces]).unbind(1)
    # Not views (FSDP2 warns of a wrapped module returning one, on every forward).
    placed = [torch.zeros(target.shape, dtype=torch.float32, device=hidden.device).index_put((rows, columns), column)
              for column in (nll, *(metric.detach() for metric in metrics))]
    return placed[0], mask, *placed[1:]


def _chunk_scores(states: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, entropy: bool) -> torch.Tensor:
    """[N, 1] fp32 NLL of `target` under the logits of `states` [N, D] (autocast's dtype),
    in fp32; with `entropy`, [N, 2]: beside it, each position's entropy (no gradient)."""
    logp = F.linear(states, weight).float().log_softmax(-1)
    nll = -logp.gather(1, target[:, None])  # what cross_entropy computes, and logp serves the entropy too
    if not entropy:
        return nll
    logp = logp.detach()
    return torch.cat([nll, -(logp.exp() * logp).sum(-1, keepdim=True)], 1)


@torch.no_grad()
def _logits_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1] entropy of the distributions of logits [B, T, V] at 0..T-2 where `mask`
    [B, T-1], else 0; a row at a time: its fp32 temporaries [T, V], not the batch's."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    for row in range(logits.shape[0]):
        logp = logits[row, :-1].float().log_softmax(-1)
        out[row] = -(logp.exp() * logp).sum(-1)
    return torch.where(mask, out, 0.0)
