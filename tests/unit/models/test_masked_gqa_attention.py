"""Masked grouped-query attention with several queries per row (a generation prefill): on
CUDA, K/V are copied to the query heads so SDPA's memory-efficient kernel can run (with
`enable_gqa`, only the math kernel takes a mask); both routes give the same outputs."""

import pytest
import torch
import torch.nn.functional as F

from offline_rlhf.models.llama import dense_attention


def _inputs(queries=5, keys=7):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, queries, 8, generator=gen)
    k, v = torch.randn(2, 2, keys, 8, generator=gen), torch.randn(2, 2, keys, 8, generator=gen)
    mask = torch.rand(2, 1, queries, keys, generator=gen) > 0.4
    mask[..., 0] = True  # every query sees a key
    return q, k, v, mask


def test_the_cuda_route_equals_the_cpu_route():
    q, k, v, mask = _inputs()
    torch.testing.assert_close(dense_attention(q, k, v, mask, "cuda"), dense_attention(q, k, v, mask, "cpu"),
                               atol=1e-6, rtol=1e-5)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1),
                                              attn_mask=mask)
    torch.testing.assert_close(dense_attention(q, k, v, mask, "cuda"), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device_type,queries,masked,expanded", [
    ("cuda", 5, True, True),    # a masked prefill: K/V expanded, no enable_gqa
    ("cpu", 5, True, False),    # CPU keeps enable_gqa
    ("cuda", 5, False, False),  # causal, no mask: flash runs GQA
    ("cuda", 1, True, False),   # one query per row
])
def test_only_a_masked_multi_query_call_on_cuda_expands_kv(monkeypatch, device_type, queries, masked, expanded):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append((k.shape[1], kw["enable_gqa"])) or sdpa(q, k, v, **kw))
    q, k, v, mask = _inputs(queries, keys=queries if not masked else 7)
    dense_attention(q, k, v, mask if masked else None, device_type)
    assert calls == ([(4, False)] if expanded else [(2, True)])
