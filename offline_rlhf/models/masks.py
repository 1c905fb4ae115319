"""Attention masks for packed sequences (several documents in one row, no attention
across documents, causal within each).

Two routes give the same attention: a dense block-diagonal causal boolean mask for
`scaled_dot_product_attention` (works everywhere, O(T^2) memory; the CPU route, since
FlexAttention's backward is not implemented on CPU in torch 2.13), and a FlexAttention
BlockMask, which skips fully masked blocks (the CUDA route).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def dense_document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids: [B, T] (padding has its own id, e.g. -1) -> bool [B, 1, T, T].
    Padding attends to earlier padding, so no row is fully masked (which would give NaN)."""
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
    return (same_document & causal).unsqueeze(1)


def flex_document_mask(document_ids: torch.Tensor) -> BlockMask:
    def document_causal(batch, head, q_idx, kv_idx):
        return (document_ids[batch, q_idx] == document_ids[batch, kv_idx]) & (q_idx >= kv_idx)

    batch, seq = document_ids.shape
    # Compiled on CUDA: the eager mask builder materializes a dense [B, T, T] mask first.
    return create_block_mask(document_causal, batch, None, seq, seq, device=document_ids.device,
                             _compile=document_ids.is_cuda)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor | BlockMask:
    """The fast route for the device: FlexAttention on CUDA, the dense mask elsewhere."""
    if document_ids.is_cuda:
        return flex_document_mask(document_ids)
    return dense_document_mask(document_ids)
