"""Grouped-query decode attention with the query heads folded onto their KV head equals
attention with K/V repeated per query head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offline_rlhf.models.llama import grouped_decode_attention


def test_folded_groups_equal_repeated_kv_heads():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 16, generator=gen)
    k, v = torch.randn(3, 2, 10, 16, generator=gen), torch.randn(3, 2, 10, 16, generator=gen)
    mask = torch.arange(10)[None, :] < torch.tensor([[4], [10], [1]])  # per-row cache lengths
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                              attn_mask=mask[:, None, None, :])
    actual = grouped_decode_attention(q, k, v, mask[:, None, None, :])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    # A query head of group 1 must not see group 0's values: swapping KV heads changes it.
    swapped = grouped_decode_attention(q, k.flip(1), v.flip(1), mask[:, None, None, :])
    assert not torch.allclose(swapped[:, 4:], actual[:, 4:])
