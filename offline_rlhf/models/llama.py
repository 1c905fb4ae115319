"""A Llama-family decoder written for one device.

It knows nothing about parallelism: local head counts are inferred from tensor shapes,
so `parallelize()` can shard the projections from outside. Weight layout and RoPE
convention (rotate-half) match Hugging Face's Llama/Mistral/Qwen2/Qwen3, so import and export
are a renaming of tensors.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from offline_rlhf.config.schema import ModelConfig, RopeScalingConfig

HEADS = ("lm", "value")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 for bf16 stability, scale in the input dtype (as HF does).
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig | None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), optionally with Llama-3 frequency-dependent scaling:
    long wavelengths are divided by `factor`, short ones kept, the band between interpolated."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq.float()
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = scaling.original_max_position / scaling.low_freq_factor
    high_freq_wavelength = scaling.original_max_position / scaling.high_freq_factor
    smooth = (scaling.original_max_position / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    in_band = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return torch.where(in_band, interpolated, scaled).float()


def rope_tables(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_seq_len, head_dim], in the rotate-half layout."""
    inv_freq = rope_inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, D] (already gathered at each token's position)."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotate_half(x) * sin


@functools.cache
def compiled_flex_attention():
    """FlexAttention is fast only compiled (eager runs an unfused reference path); compiled
    once, on first use, on CUDA only (CPU uses it for forward-only checks)."""
    return torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True)
class KeySpan:
    """Decode attention without a mask tensor: query row b (one query per row) attends to
    key columns starts[b]..ends[b], both inclusive. starts, ends: int [B] on the device."""

    starts: torch.Tensor
    ends: torch.Tensor


AttentionMask = torch.Tensor | BlockMask | KeySpan


class Attention(nn.Module):
    """Grouped-query attention through `scaled_dot_product_attention` (FlexAttention for a
    BlockMask or a KeySpan). `fuse()` merges wq, wk, wv into one projection `wqkv`. With
    `qk_norm` (Qwen3) each head's queries and keys are RMS-normalized before RoPE, by
    weights shared by the heads (so under tensor parallelism each rank's gradient of them
    is a partial sum: `offline_rlhf.parallel.grad.sum_head_norm_grads`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.resolved_head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.wqkv: nn.Linear | None = None
        self.qkv_sizes: tuple[int, int, int] = (0, 0, 0)  # output columns of q, k, v within wqkv

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.wqkv is None:
            return self.wq(x), self.wk(x), self.wv(x)
        return self.wqkv(x).split(self.qkv_sizes, dim=-1)

    def fuse(self) -> None:
        self.qkv_sizes = tuple(linear.out_features for linear in (self.wq, self.wk, self.wv))
        self.wqkv = concatenated_linear(self.wq, self.wk, self.wv)
        del self.wq, self.wk, self.wv

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: AttentionMask | None = None, cache=None) -> torch.Tensor:
        """`cache`: this layer's KV cache (see `offline_rlhf.generation.kv_cache`); it stores
        the new k, v and returns all cached ones, [B, H_kv_local, S, D]. Passed by keyword so
        TP's PrepareModuleInput hook (positional inputs only) leaves it alone."""
        batch, seq, _ = x.shape
        q, k, v = self.project(x)
        # -1: the number of heads held here (all of them, or this rank's TP shard).
        q, k = q.view(batch, seq, -1, self.head_dim), k.view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.view(batch, seq, -1, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if cache is not None:
            k, v = cache.update(k, v)
        grouped = k.shape[1] != q.shape[1]
        if isinstance(attn_mask, KeySpan):
            out = span_decode_attention(q, k, v, attn_mask)
        elif seq == 1 and grouped and isinstance(attn_mask, torch.Tensor):
            out = grouped_decode_attention(q, k, v, attn_mask)
        elif isinstance(attn_mask, BlockMask):
            flex = compiled_flex_attention() if q.is_cuda else flex_attention
            out = flex(q, k, v, block_mask=attn_mask, enable_gqa=grouped)
        else:
            out = dense_attention(q, k, v, attn_mask, q.device.type)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    device_type: str) -> torch.Tensor:
    """SDPA, causal without a mask. PyTorch's grouped-query attention (`enable_gqa`) runs on
    CUDA in the flash and math kernels only, and flash takes no mask: a masked call with
    several queries per row (a generation prefill) would run the math kernel, which holds
    [B, H, T, S] fp32 scores (4 GB per layer for 32 prompts of 1024 tokens on Llama-3-8B).
    There K/V are copied to the query heads instead, so the memory-efficient kernel can run.
    `device_type`: the tensors' (an argument, so a test takes the CUDA route on CPU)."""
    if device_type == "cuda" and mask is not None and q.shape[2] > 1 and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=k.shape[1] != q.shape[1])


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Decode attention (one query per sequence, q [B, H, 1, D]) for grouped-query heads:
    each KV head's group of query heads becomes that head's query rows, [B, H_kv, H/H_kv, D],
    so attention reads each cached K/V once. (`enable_gqa` with a mask takes a path that
    copies K/V once per query head.) mask: [B, 1, 1, S]."""
    batch, heads, _, dim = q.shape
    grouped_q = q.reshape(batch, k.shape[1], heads // k.shape[1], dim)
    return F.scaled_dot_product_attention(grouped_q, k, v, attn_mask=mask).reshape(batch, heads, 1, dim)


def span_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: KeySpan) -> torch.Tensor:
    """Decode attention (q [B, H, 1, D]) over each row's key columns span.starts..span.ends,
    with FlexAttention: the span is a score_mod, so no [B, 1, 1, S] mask is built. No
    BlockMask: every key block is visited, the span check costs one compare per score.
    Called uncompiled: the decode step that calls it is compiled as a whole on CUDA (eager,
    on CPU, FlexAttention runs its unfused reference path)."""
    if q.shape[2] != 1:
        raise ValueError(f"a KeySpan gives one query per row its key columns; got {q.shape[2]} queries per row")
    starts, ends = span.starts, span.ends

    def within_span(score, b, h, q_idx, kv_idx):
        return torch.where((kv_idx >= starts[b]) & (kv_idx <= ends[b]), score, -float("inf"))

    return flex_attention(q, k, v, score_mod=within_span, enable_gqa=k.shape[1] != q.shape[1])


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). `fuse()` merges w1 and w3 into one projection `w13`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w13: nn.Linear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (self.w1(x), self.w3(x)) if self.w13 is None else self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)

    def fuse(self) -> None:
        self.w13 = concatenated_linear(self.w1, self.w3)
        del self.w1, self.w3


def concatenated_linear(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing all of `linears` at once, their outputs side by side: one
    matrix-vector product per token instead of several smaller ones, which run below the
    memory bandwidth the large ones reach (decode reads every weight once per step)."""
    first = linears[0]
    fused = nn.Linear(first.in_features, sum(linear.out_features for linear in linears), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([linear.weight for linear in linears]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([linear.bias for linear in linears]))
    return fused


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache=cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder with an LM head (`head="lm"`: logits [B, T, V]) or a scalar value head
    (`head="value"`: values [B, T]) for the reward model and the PPO critic."""

    def __init__(self, cfg: ModelConfig, head: str = "lm"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.cfg = cfg
        self.head = head
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if head == "lm":
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
            self.tie_weights()
        else:
            self.score = nn.Linear(cfg.dim, 1, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                attn_mask: AttentionMask | None = None, cache=None, last_only: bool = False,
                head_fn: Callable[[torch.Tensor, nn.Linear], Any] | None = None) -> Any:
        """tokens: [B, T]. positions: [B, T] (default 0..T-1; restart per document when
        packing). attn_mask: default causal; a bool [B, 1, T, T] (True = may attend) or a
        FlexAttention BlockMask (see `offline_rlhf.models.masks`). cache: one KV cache per
        layer for incremental decoding; then attn_mask is required, [B, 1, T, S] over all
        S cached positions (the default causal mask would align queries to key 0), or,
        for a decode step (T = 1), a KeySpan of each row's cached columns.
        last_only: apply the head to the last position only (a generation prefill needs
        one row of logits, not [B, T, V]).
        head_fn: what an LM returns instead of logits: `head_fn(h, self.output)` of the final
        hidden states [B, T, D]. A loss that needs some positions' log-probs computes only
        those, a chunk at a time (`offline_rlhf.parallel.logprobs.model_token_nll`); inside
        forward, where FSDP has gathered the head's weight."""
        if head_fn is not None and self.head != "lm":
            raise ValueError("head_fn replaces an LM head's logits; this model has a value head")
        if cache is not None and attn_mask is None:
            raise ValueError("decoding with a KV cache needs an explicit attn_mask [B, 1, T, S] or a KeySpan")
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = self.tok_embeddings(tokens)
        for index, layer in enumerate(self.layers):
            h = layer(h, cos, sin, attn_mask, cache=None if cache is None else cache[index])
        h = self.norm(h[:, -1:] if last_only else h)
        if self.head == "lm":
            return self.output(h) if head_fn is None else head_fn(h, self.output)
        # In the weights' dtype (fp32), not autocast's bf16: rounded to bf16, a reward of 5.3
        # would read 5.3125 and close pairs would tie. Not a view: FSDP2 warns (on every
        # forward) of a wrapped module returning one, which an in-place op by the caller
        # would detach from its backward hook.
        with torch.autocast(h.device.type, enabled=False):
            return self.score(h.to(self.score.weight.dtype)).squeeze(-1).clone()

    def tie_weights(self) -> None:
        """Share the embedding with the output projection when configured. Call again after
        anything that replaces parameter objects (`to_empty` from meta, TP distribution)."""
        if self.head == "lm" and self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for projections and embeddings; output projections of each
        residual branch scaled by 1/sqrt(2 * n_layers) (GPT-2); norms to one; biases to zero."""
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(".bias"):
                nn.init.zeros_(param)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(param, std=residual_std)
            else:
                nn.init.normal_(param, std=self.cfg.init_std)

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str) -> None:
        """Recompute RoPE tables on `device` (needed after materializing from meta)."""
        self.rope_cos, self.rope_sin = rope_tables(self.cfg, device)


def fuse_projections(model: Transformer) -> Transformer:
    """In place, for a model that only generates: each block's wq, wk, wv become one
    projection `wqkv` and w1, w3 one `w13` (the old weights freed), fewer and larger
    matrix-vector products per decode step; same outputs. The fused parameters match no
    checkpoint's or Hugging Face's names, so the model refuses `state_dict()` (checkpoint
    saving and export go through it) instead of writing wrongly named weights. Refuses
    weights that are not plain tensors (a tensor subclass such as a tensor-parallel shard:
    concatenating local pieces would interleave ranks' heads)."""
    if any(type(param.data) is not torch.Tensor for param in model.parameters()):
        raise ValueError("fuse_projections needs whole weights; this model's are sharded (not plain tensors): "
                         "keep its separate projections")
    if any(block.attention.wqkv is not None for block in model.layers):
        raise ValueError("this model's projections are already fused")
    for block in model.layers:
        block.attention.fuse()
        block.feed_forward.fuse()
    model.register_state_dict_pre_hook(_refuse_fused_state_dict)
    return model


def _refuse_fused_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    raise ValueError("this model's projections are fused (wqkv, w13) for inference: it has no checkpoint layout; "
                     "save the model it was loaded from instead")


def last_token_values(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values: [B, T] from the value head; lengths: [B] number of real (non-padding) tokens
    of right-padded sequences. Returns [B], each read at its last real token."""
    return values.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
