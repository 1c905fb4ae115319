"""top-k and top-p on constructed distributions whose allowed sets are known exactly."""

from __future__ import annotations

import pytest
import torch

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import MIN_TEMPERATURE, GenerationConfig
from offline_rlhf.generation.sampling import (
    NOT_FINITE,
    RowRules,
    Rule,
    keep_top_p,
    keyed_uniforms,
    sample_next,
    stream_id,
)
from offline_rlhf.generation.shards import shard_indices

DRAWS = 5000
VOCAB = 32


def draws(logits: torch.Tensor, cfg: GenerationConfig) -> set[int]:
    """Tokens from DRAWS samples of one distribution (logits [V], repeated as a batch)."""
    uniforms = torch.rand(DRAWS, generator=torch.Generator().manual_seed(0))
    return set(sample_next(logits.expand(DRAWS, -1), cfg, uniforms).tolist())


def constructed_logits(probs: list[float]) -> tuple[torch.Tensor, list[int]]:
    """Logits [VOCAB] giving `probs` (descending) to shuffled token ids and the remaining
    mass evenly to the rest; also the token ids in descending probability."""
    ranked = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3)).tolist()
    rest = (1 - sum(probs)) / (VOCAB - len(probs))
    full = torch.full((VOCAB,), rest)
    full[ranked[:len(probs)]] = torch.tensor(probs)
    return full.log(), ranked


def test_each_row_samples_by_its_own_rule_as_it_would_alone():
    """Rows of one batch with their own greedy / temperature / top_p pick the tokens each
    row picks in a batch of its rule alone (top_k is the run's)."""
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1))
    uniforms = torch.rand(6, generator=torch.Generator().manual_seed(2))
    rules = [Rule(), Rule(False, 1.5), Rule(False, 0.3, 0.6), Rule(False, 1.0, 0.2), Rule(), Rule(False, 2.0, 0.9)]
    for top_k in (5, 0):
        mixed = sample_next(logits, GenerationConfig(top_k=top_k), uniforms, RowRules(rules, "cpu"))
        for row, rule in enumerate(rules):
            cfg = GenerationConfig(greedy=rule.greedy, temperature=rule.temperature, top_p=rule.top_p, top_k=top_k)
            assert mixed[row] == sample_next(logits[row:row + 1], cfg, uniforms[row:row + 1]), (row, rule)
    assert not torch.equal(mixed, logits.argmax(-1))  # a sampled row (the last, T=2) did not take the argmax


def test_a_row_without_a_nucleus_keeps_its_tail_beside_rows_with_one():
    """Over a large vocabulary the float32 cumulative mass of a peaky row reaches 1 before
    its end: a top_p=1 row batched with top_p<1 rows must still draw from its whole
    distribution, as it does alone."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(512, 32000, generator=generator) * 4
    uniforms = torch.rand(512, generator=generator) ** 8  # many draws far in the tail
    rules = [Rule(False, 1.0, 1.0 if row % 2 else 0.9) for row in range(512)]
    mixed = sample_next(logits, GenerationConfig(), uniforms, RowRules(rules, "cpu"))
    alone = sample_next(logits[1::2], GenerationConfig(greedy=False), uniforms[1::2])
    assert torch.equal(mixed[1::2], alone)


def test_greedy_is_argmax():
    logits, ranked = constructed_logits([0.3, 0.2])
    assert sample_next(logits[None], GenerationConfig()).tolist() == [ranked[0]]


def test_top_k_draws_only_the_k_most_likely():
    logits, ranked = constructed_logits([0.12, 0.11, 0.1, 0.09, 0.08])
    assert draws(logits, GenerationConfig(greedy=False, top_k=5)) == set(ranked[:5])


@pytest.mark.parametrize("top_p, nucleus", [(0.8, 3), (0.5, 1), (0.95, 4)])
def test_top_p_draws_only_the_nucleus(top_p, nucleus):
    # Cumulative mass 0.5, 0.75, 0.9, 0.96: the nucleus is the shortest prefix reaching top_p.
    logits, ranked = constructed_logits([0.5, 0.25, 0.15, 0.06])
    assert draws(logits, GenerationConfig(greedy=False, top_p=top_p)) == set(ranked[:nucleus])


def test_top_k_then_top_p_and_temperature():
    # top_k=3 renormalizes 0.4/0.3/0.2 to 0.44/0.33/0.22; top_p=0.7 then needs two tokens.
    logits, ranked = constructed_logits([0.4, 0.3, 0.2, 0.05])
    assert draws(logits, GenerationConfig(greedy=False, top_k=3, top_p=0.7)) == set(ranked[:2])
    assert draws(logits, GenerationConfig(greedy=False, temperature=1e-3)) == {ranked[0]}


def test_a_top_p_that_rounds_to_zero_in_float32_keeps_the_most_likely_token():
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(1))
    kept = keep_top_p(logits, 1e-46)  # 0 in float32: every mass before a token is >= it
    assert torch.equal(kept.isfinite(), torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).bool())
    sampled = sample_next(logits, GenerationConfig(greedy=False, top_p=1e-46), torch.rand(8))
    assert torch.equal(sampled, logits.argmax(-1))


def test_the_smallest_temperature_samples_the_argmax_even_where_logits_over_it_overflow():
    # Logits of 1e34 over 1e-5 exceed float32 (inf - inf would be NaN); the distribution is
    # then all on the argmax, as it is for ordinary logits 0.1 apart.
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(2))
    cfg = GenerationConfig(greedy=False, temperature=MIN_TEMPERATURE)
    for scale in (1.0, 1e34):
        assert torch.equal(sample_next(logits * scale, cfg, torch.rand(8)), logits.argmax(-1))


@pytest.mark.parametrize("cfg", [GenerationConfig(), GenerationConfig(greedy=False, top_k=5, top_p=0.9)])
def test_a_row_of_logits_that_are_not_finite_gets_no_token(cfg):
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(4))
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    logits[3] = float("-inf")
    logits[4, :VOCAB - 1] = float("-inf")  # -inf is probability 0: the row's one finite logit is its token
    uniforms = torch.rand(5, generator=torch.Generator().manual_seed(5))
    tokens = sample_next(logits.bfloat16(), cfg, uniforms).tolist()
    assert tokens[1:] == [NOT_FINITE, NOT_FINITE, NOT_FINITE, VOCAB - 1]
    assert 0 <= tokens[0] == sample_next(logits[:1].bfloat16(), cfg, uniforms[:1]).item()  # the others' fault only


def test_same_seed_same_tokens():
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(0))
    cfg = GenerationConfig(greedy=False)
    streams, steps = torch.arange(64), torch.zeros(64, dtype=torch.long)

    def sample(seed):
        return sample_next(logits, cfg, keyed_uniforms(seed, streams, steps))

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


@pytest.mark.parametrize("n_items, world", [(10, 3), (2, 4), (0, 2), (8, 1)])
def test_shards_are_disjoint_balanced_and_ordered(n_items, world):
    shards = [list(shard_indices(n_items, rank, world)) for rank in range(world)]
    assert sum(shards, []) == list(range(n_items))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("field, value", [("max_new_tokens", 0), ("temperature", 0.0), ("temperature", 1e-6),
                                          ("temperature", 1e-46), ("top_p", 0.0),
                                          ("top_p", 1.5), ("top_k", -1), ("batch_size", 0)])
def test_config_rejects(field, value):
    with pytest.raises(ConfigError, match=f"generation.{field}"):
        GenerationConfig(**{field: value})


def test_sampling_follows_the_distribution():
    """Inverse-CDF sampling at keyed uniforms draws each token about as often as its
    probability says (4000 streams; 5 standard errors)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    streams = torch.tensor([stream_id(i, 0) for i in range(4000)])
    tokens = sample_next(probs.log().expand(4000, -1), GenerationConfig(greedy=False),
                         keyed_uniforms(3, streams, torch.zeros_like(streams)))
    frequencies = torch.bincount(tokens, minlength=4).double() / 4000
    assert ((frequencies - probs.double()).abs() <= 5 * (probs * (1 - probs) / 4000).sqrt().double()).all()


def test_keyed_uniforms_are_uniform_and_depend_on_every_key():
    streams = torch.tensor([stream_id(i % 100, i // 100) for i in range(10000)])
    steps = torch.arange(10000) % 7
    u = keyed_uniforms(11, streams, steps)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert torch.histc(u.float(), bins=10, min=0, max=1).min() > 900  # every tenth holds about 1000
    base = keyed_uniforms(11, streams[:1], steps[:1])
    for changed in (keyed_uniforms(12, streams[:1], steps[:1]), keyed_uniforms(11, streams[:1] + 1, steps[:1]),
                    keyed_uniforms(11, streams[:1] + (1 << 32), steps[:1]),
                    keyed_uniforms(11, streams[:1], steps[:1] + 1)):
        assert not torch.equal(base, changed)
