"""The KV-cache engine against decoding without a cache (ours, then transformers'), and
its batching: different prompt lengths, EOS, input order."""

from __future__ import annotations

import pytest
import torch

from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.generation.engine import generate
from offline_rlhf.generation.kv_cache import new_cache
from tests.fixtures import TINY, reference_model

PAD = 0
NEW_TOKENS = 12


def prompts_of_lengths(lengths, vocab_size: int = TINY.vocab_size, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def greedy_without_cache(model, prompt: list[int], steps: int) -> list[int]:
    """Argmax decoding that recomputes the whole prefix each step: one prompt, no padding."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    return sequence[len(prompt):]


@pytest.mark.parametrize("batch_size", [8, 2])
def test_greedy_with_cache_matches_full_recompute(batch_size):
    model = reference_model().eval()
    prompts = prompts_of_lengths([3, 9, 1, 6, 14])
    expected = [greedy_without_cache(model, p, NEW_TOKENS) for p in prompts]
    actual = generate(model, prompts, GenerationConfig(NEW_TOKENS, batch_size=batch_size), None, PAD, "cpu")
    assert actual == expected


def test_rows_stop_at_their_eos_and_keep_it():
    model = reference_model().eval()
    prompts = prompts_of_lengths([3, 9, 1, 6])
    full = [greedy_without_cache(model, p, NEW_TOKENS) for p in prompts]
    eos = full[1][4]  # some row emits it mid-way; the others may or may not
    expected = [row[:row.index(eos) + 1] if eos in row else row for row in full]
    assert generate(model, prompts, GenerationConfig(NEW_TOKENS), eos, PAD, "cpu") == expected
    assert len(expected[1]) <= 5


@pytest.mark.parametrize("family,extra", [("llama", {}), ("qwen3", {"head_dim": 32})], ids=["llama", "qwen3"])
def test_matches_transformers_greedy_generate(tmp_path, family, extra):
    """Qwen3: q/k norms (weights drawn, not their initial ones) on cached keys too."""
    import transformers

    from offline_rlhf.models.hf import HFWeights, load_hf_weights, read_hf_config
    from offline_rlhf.stages.convert import empty_model

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        family, vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
        **extra)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("_norm.weight"):
                param.normal_(1.0, 0.3)
    hf.save_pretrained(tmp_path)
    ours = empty_model(read_hf_config(tmp_path), "lm").eval()
    load_hf_weights(ours, HFWeights(tmp_path))

    prompts = prompts_of_lengths([5, 17, 2], vocab_size=300)
    actual = generate(ours, prompts, GenerationConfig(NEW_TOKENS), None, PAD, "cpu")
    for prompt, tokens in zip(prompts, actual):
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS)
        assert tokens == out[0, len(prompt):].tolist()


def test_sampling_is_reproducible_per_seed():
    model = reference_model().eval()
    prompts = prompts_of_lengths([4, 7, 2])

    def sample(seed):
        cfg = GenerationConfig(NEW_TOKENS, greedy=False, temperature=1.5, top_k=50, top_p=0.95, seed=seed)
        return generate(model, prompts, cfg, None, PAD, "cpu")

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_rejects_requests_the_model_cannot_hold():
    model = reference_model().eval()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 60], GenerationConfig(TINY.max_seq_len - 59), None, PAD, "cpu")
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], GenerationConfig(4), None, PAD, "cpu")


def test_cache_needs_an_explicit_mask():
    model = reference_model().eval()
    with pytest.raises(ValueError, match="attn_mask"):
        model(torch.tensor([[1, 2]]), cache=new_cache(TINY.n_layers, 1, 8))
