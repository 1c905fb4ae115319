"""RMSNorm, RoPE and attention against straightforward reference formulas."""

import math

import pytest
import torch

from offline_rlhf.config.schema import ModelConfig, RopeScalingConfig
from offline_rlhf.models.llama import (
    Attention,
    RMSNorm,
    Transformer,
    apply_rope,
    last_token_values,
    rope_inverse_frequencies,
    rope_tables,
)


def test_rmsnorm_matches_formula():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5, 0.0, 4.0, -1.0, 2.0]])
    rms = math.sqrt(sum(v * v for v in x[0].tolist()) / 8 + 1e-6)
    expected = x / rms * torch.arange(1.0, 9.0)
    torch.testing.assert_close(norm(x), expected)


def test_rope_rotates_each_pair_by_position_times_frequency():
    head_dim, theta, pos = 4, 100.0, 3
    cfg = ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, ffn_dim=8, max_seq_len=8, rope_theta=theta)
    cos, sin = rope_tables(cfg)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, head_dim)
    out = apply_rope(x, cos[pos].view(1, 1, head_dim), sin[pos].view(1, 1, head_dim)).flatten()
    # Rotate-half pairs element i with element i + d/2, at angle pos * theta^(-2i/d).
    for i, freq in enumerate([1.0, theta ** -0.5]):
        a, b = x.flatten()[i].item(), x.flatten()[i + 2].item()
        angle = pos * freq
        assert out[i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-6)
        assert out[i + 2].item() == pytest.approx(b * math.cos(angle) + a * math.sin(angle), abs=1e-6)


def test_rope_relative_property():
    """<rope(q, m), rope(k, n)> depends only on m - n."""
    cfg = ModelConfig(vocab_size=8, dim=16, n_layers=1, n_heads=1, ffn_dim=8, max_seq_len=32)
    cos, sin = rope_tables(cfg)
    q, k = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))

    def score(m, n):
        rq = apply_rope(q.view(1, 1, 1, 16), cos[m].view(1, 1, 16), sin[m].view(1, 1, 16))
        rk = apply_rope(k.view(1, 1, 1, 16), cos[n].view(1, 1, 16), sin[n].view(1, 1, 16))
        return (rq * rk).sum().item()

    assert score(7, 3) == pytest.approx(score(14, 10), abs=1e-5)
    by_offset = [score(10, 10 - offset) for offset in range(6)]
    assert max(by_offset) - min(by_offset) > 0.1  # ...but does depend on it


def test_llama3_rope_scaling_bands():
    scaling = RopeScalingConfig(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64)
    base = rope_inverse_frequencies(32, 10000.0, None)
    scaled = rope_inverse_frequencies(32, 10000.0, scaling)
    wavelength = 2 * math.pi / base
    high = wavelength < 64 / 4  # short wavelengths: unchanged
    low = wavelength > 64 / 1  # long wavelengths: divided by the factor
    torch.testing.assert_close(scaled[high], base[high])
    torch.testing.assert_close(scaled[low], base[low] / 8)
    band = ~(high | low)
    assert band.any() and (scaled[band] < base[band]).all() and (scaled[band] > base[band] / 8).all()


def test_grouped_query_attention_matches_explicit_softmax():
    cfg = ModelConfig(vocab_size=8, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8, max_seq_len=16)
    torch.manual_seed(0)
    attn = Attention(cfg)
    x = torch.randn(2, 5, 32)
    cos, sin = rope_tables(cfg)
    positions = torch.arange(5).expand(2, -1)
    out = attn(x, cos[positions], sin[positions])

    hd = 8
    q = apply_rope(attn.wq(x).view(2, 5, 4, hd), cos[positions], sin[positions])
    k = apply_rope(attn.wk(x).view(2, 5, 2, hd), cos[positions], sin[positions])
    v = attn.wv(x).view(2, 5, 2, hd)
    heads = []
    for h in range(4):
        kv = h // 2  # query heads 0,1 share KV head 0; 2,3 share KV head 1
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.triu(torch.ones(5, 5, dtype=torch.bool), 1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, :, kv])
    expected = attn.wo(torch.cat(heads, dim=-1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_value_head_reads_last_real_token():
    cfg = ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, ffn_dim=16, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg, head="value")
    model.init_weights()
    tokens = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    values = last_token_values(model(tokens), torch.tensor([3, 5]))
    # Causal attention: padding after the last real token cannot change its value.
    torch.testing.assert_close(values[0], model(tokens[:1, :3])[0, -1])
    torch.testing.assert_close(values[1], model(tokens[1:])[0, -1])
    # Its own tensor, not a view of the head's [B, T, 1] output: FSDP2 warned of a wrapped
    # module returning a view on every forward of a multi-process reward model.
    assert model(tokens)._base is None


def test_tied_embeddings_share_one_tensor_and_count_once():
    cfg = ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, ffn_dim=16, max_seq_len=16, tie_embeddings=True)
    model = Transformer(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_qkv_bias_switch():
    cfg = ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, ffn_dim=16, max_seq_len=16, qkv_bias=True)
    attn = Transformer(cfg).layers[0].attention
    assert attn.wq.bias is not None and attn.wk.bias is not None and attn.wv.bias is not None
    assert attn.wo.bias is None
    assert sum(p.numel() for p in Transformer(cfg).parameters()) == cfg.num_params()


def test_qk_norm_switch_counts_its_weights():
    cfg = ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, ffn_dim=16, max_seq_len=16, qk_norm=True,
                      head_dim=12)
    attn = Transformer(cfg).layers[0].attention
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (12,)
    assert sum(p.numel() for p in Transformer(cfg).parameters()) == cfg.num_params()
