"""Decode attention over each row's span of key columns (`KeySpan`, FlexAttention with a
score_mod, no mask tensor) against the boolean-mask path, through the whole model with
the KV cache a decode step writes (`decode_logits`): eager and compiled with dynamic shapes.
The step's inputs are separate tensors (as `decode.StepInputs`): compiled for CPU,
FlexAttention takes only the compiled function's inputs into its score_mod."""

from __future__ import annotations

import pytest
import torch

from offline_rlhf.config.schema import ModelConfig
from offline_rlhf.generation.decode import StepInputs, decode_logits
from offline_rlhf.generation.kv_cache import TokenWrite
from offline_rlhf.models.llama import KeySpan
from tests.fixtures import TINY, reference_model

# Eager FlexAttention warns (once) that it runs its unfused reference implementation: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

UNGROUPED = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128, max_seq_len=64)
CPU = torch.device("cpu")
CACHE_LEN = 40
SLOTS = 6  # more than any step's rows, as in the engine (a compiled step assumes no equal sizes)
# Per row (token, column, start): a span of one column at 0, one of one column past 0, a
# prompt starting past column 0 (a reused slot), a long span.
ROWS = [(5, 0, 0), (17, 6, 6), (40, 20, 11), (3, 27, 0)]


def random_cache(model, slots: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (slots, model.cfg.kv_heads, CACHE_LEN, model.cfg.resolved_head_dim)
    return [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in model.layers]


def both_paths(forward, model, rows, width):
    """(mask logits, mask cache), (span logits, span cache), each from its own copy of one cache."""
    results = []
    for span in (False, True):
        kv = random_cache(model, SLOTS)
        with torch.no_grad():
            results.append((forward(model, kv, *StepInputs.of(rows, CPU), width, span), kv))
    return results


@pytest.mark.parametrize("cfg", [TINY, UNGROUPED], ids=["grouped", "ungrouped"])
def test_span_attention_equals_the_mask_path(cfg):
    model = reference_model(cfg).eval()
    (masked, masked_kv), (spanned, spanned_kv) = both_paths(decode_logits, model, ROWS, 32)  # 4 columns past the last
    torch.testing.assert_close(spanned, masked, rtol=1e-5, atol=1e-5)
    for (k, v), (k_mask, v_mask) in zip(spanned_kv, masked_kv):  # layer 0's equal, later ones to rounding
        torch.testing.assert_close(k, k_mask, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, v_mask, rtol=1e-5, atol=1e-5)
    # Row 2 attends to columns 11..20: changing keys and values outside them changes nothing,
    # changing column 11 changes row 2 only.
    outside, inside = random_cache(model, SLOTS), random_cache(model, SLOTS)
    for (k, v), (k_in, v_in) in zip(outside, inside):
        for cache in (k, v):
            cache[2, :, :11] += 1
            cache[2, :, 21:] += 1
        k_in[2, :, 11] += 1
        v_in[2, :, 11] += 1
    with torch.no_grad():
        unseen, seen = (decode_logits(model, kv, *StepInputs.of(ROWS, CPU), 32, flex=True) for kv in (outside, inside))
    torch.testing.assert_close(unseen, spanned, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen[2], spanned[2], atol=1e-3)
    torch.testing.assert_close(seen[[0, 1, 3]], spanned[[0, 1, 3]], rtol=1e-5, atol=1e-5)


def test_a_span_is_one_query_per_row():
    model = reference_model().eval()
    kv = random_cache(model, SLOTS)
    span = KeySpan(torch.tensor([0, 0]), torch.tensor([3, 3]))
    writes = [TokenWrite(k, v, torch.tensor([3, 3]), 8) for k, v in kv]
    with pytest.raises(ValueError, match="one query per row"):
        model(torch.ones(2, 2, dtype=torch.long), attn_mask=span, cache=writes)


def test_compiled_span_attention_equals_the_mask_path_at_two_shapes():
    """torch.compile(dynamic=True), as the CUDA decode step runs: the KeySpan built inside
    the compiled function, one compilation serving (4 rows, 32 columns) and (3, 24)."""
    from torch._dynamo.utils import counters

    model = reference_model().eval()
    shapes = [(ROWS[:count], width) for count, width in ((4, 32), (3, 24))]
    eager = [both_paths(decode_logits, model, rows, width)[0][0] for rows, width in shapes]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(decode_logits, dynamic=True)
    for (rows, width), expected in zip(shapes, eager):
        (masked, masked_kv), (spanned, spanned_kv) = both_paths(compiled, model, rows, width)
        torch.testing.assert_close(spanned, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5)
        for (k, _), (k_mask, _) in zip(spanned_kv, masked_kv):
            torch.testing.assert_close(k, k_mask, rtol=1e-5, atol=1e-5)
    # One graph for the mask, one for the span, each serving both shapes.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
