"""The bucketed decode step (the shapes CUDA graphs capture) against the exact-shape step:
padding rows and columns change no row's tokens, greedy or sampled. On CPU it runs the
same code as on CUDA, without the capture."""

from __future__ import annotations

import functools

import pytest
import torch

from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.generation import decode, engine
from offline_rlhf.generation.decode import DynamicStep, StaticStep, decode_step_for
from offline_rlhf.generation.engine import EngineStats, Request, run
from offline_rlhf.generation.kv_cache import new_cache
from offline_rlhf.generation.sampling import stream_id
from tests.fixtures import reference_model
from tests.unit.generation.test_engine import PAD, greedy_without_cache, prompts_of_lengths

LENGTHS = [3, 9, 1, 6, 14, 2, 5, 11, 4, 7, 8]


@pytest.fixture(scope="module")
def model():
    return reference_model().eval()


@pytest.fixture
def small_buckets(monkeypatch):
    """Width buckets of 4 columns, so one run crosses several of them."""
    monkeypatch.setattr(decode, "WIDTH_BUCKET", 4)


def completions(model, cfg, prompts, eos=None, static=None, stats=None, session=None):
    requests = [Request(p, stream_id(i, j), cfg.max_new_tokens) for i, p in enumerate(prompts) for j in range(cfg.n)]
    return run(model, requests, cfg, eos, PAD, "cpu", stats=stats, static=static, session=session)


def test_bucketed_greedy_decode_matches_each_prompt_alone(model, small_buckets):
    prompts = prompts_of_lengths(LENGTHS)
    full = [greedy_without_cache(model, p, 16) for p in prompts]
    eos = full[0][2]
    expected = [row[:row.index(eos) + 1] if eos in row else row for row in full]
    stats = EngineStats()
    static = completions(model, GenerationConfig(16, batch_size=5), prompts, eos, static=True, stats=stats)
    assert [c.tokens for c in static] == expected
    assert stats.admissions == len(prompts) > 5 and stats.graphs == 0  # no graphs off CUDA


def test_bucketed_sampling_draws_what_exact_shapes_draw(model, small_buckets):
    cfg = GenerationConfig(12, greedy=False, temperature=1.2, top_p=0.9, seed=3, batch_size=6, n=3)
    prompts = prompts_of_lengths(LENGTHS[:5])
    static = [c.tokens for c in completions(model, cfg, prompts, static=True)]
    assert static == [c.tokens for c in completions(model, cfg, prompts, static=False)]
    assert len({tuple(answer) for answer in static[:3]}) > 1


def test_buckets_are_powers_of_two_up_to_the_slots_and_width_multiples(model, small_buckets):
    step = StaticStep(model, new_cache(2, slots=7, max_len=31), (6, 30), torch.device("cpu"), graphs=False)
    assert step.forward is decode.decode_logits
    assert [step.shape(busy, 1)[0] for busy in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert [step.shape(1, width)[1] for width in (1, 4, 5, 29, 30)] == [4, 4, 8, 30, 30]


def test_cpu_takes_the_exact_step_unless_told_otherwise(model):
    cache, cpu = new_cache(2, 2, 8), torch.device("cpu")
    assert isinstance(decode_step_for(model, cache, (2, 8), cpu, GenerationConfig()), DynamicStep)
    forced = decode_step_for(model, cache, (2, 8), cpu, GenerationConfig(), static=True)
    assert isinstance(forced, StaticStep) and not forced.graphs and forced.forward is decode.decode_logits


@pytest.mark.slow
@pytest.mark.parametrize("flex,mode", [(False, "default"), (True, "default"), (False, "coordinate-descent")],
                         ids=["mask", "flex", "mask-coordinate-descent"])
def test_the_compiled_step_decodes_what_the_eager_step_decodes_and_compiles_once_for_all_buckets(
        model, small_buckets, monkeypatch, flex, mode):
    """torch.compile (inductor; the CUDA path's compiler, here on CPU) of the bucketed step,
    attending through a boolean mask or FlexAttention over each row's span, with inductor's
    options as a compile mode sets them: the same greedy tokens, the cache writes kept, no
    recompilation per bucket or per run."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_step = functools.partial(decode.compiled_decode_logits(mode), flex=flex)
    monkeypatch.setattr(engine, "decode_step_for", lambda model, cache, limits, device, *_: StaticStep(
        model, cache, limits, device, graphs=False, forward=compiled_step))
    prompts = prompts_of_lengths(LENGTHS)
    cfg = GenerationConfig(16, batch_size=5)
    compiled = [c.tokens for c in completions(model, cfg, prompts, eos=None)]
    again = [c.tokens for c in completions(model, GenerationConfig(10, batch_size=3), prompts[:4])]
    monkeypatch.undo()
    assert compiled == [c.tokens for c in completions(model, cfg, prompts, static=True)]
    assert again == [c.tokens for c in completions(model, GenerationConfig(10, batch_size=3), prompts[:4])]
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # rows 1 and >1, not per bucket


def test_the_compiled_step_runs_under_its_own_recompile_limit(monkeypatch):
    """Each model, dtype, row count and attention kind compiles the step anew; past dynamo's
    default limit of 8 (eval of several checkpoints in one process) it ran uncompiled, which
    FlexAttention cannot inside a CUDA graph capture (seen on an H100)."""
    limits = []
    monkeypatch.setattr(torch, "compile", lambda function, **_: lambda *args, **kwargs: limits.append(
        torch._dynamo.config.recompile_limit))
    decode.compiled_decode_logits.cache_clear()
    try:
        for mode in ("default", "coordinate-descent"):
            decode.compiled_decode_logits(mode)("model", "kv", flex=True)
    finally:
        decode.compiled_decode_logits.cache_clear()
    assert limits == [decode.DECODE_RECOMPILE_LIMIT] * 2 and decode.DECODE_RECOMPILE_LIMIT > 8
    assert torch._dynamo.config.recompile_limit == 8  # only while the step compiles


def test_the_engine_launches_the_next_step_before_reading_the_last(model, small_buckets, monkeypatch):
    """One step ahead: when the host reads step t's tokens, step t+1 is already launched
    (from tokens step t left on the device). When rows end, the step ahead is read too (its
    tokens count for the other rows) before the slots change: nothing launched goes unread,
    and every answer is what decoding its prompt alone without a cache gives."""
    prompts = prompts_of_lengths(LENGTHS)
    full = [greedy_without_cache(model, p, 16) for p in prompts]
    eos = full[0][2]
    expected = [row[:row.index(eos) + 1] if eos in row else row for row in full]
    unread_at_read, stats = [], EngineStats()
    read = engine.TokenRead.tokens
    monkeypatch.setattr(engine.TokenRead, "tokens", lambda self: unread_at_read.append(
        stats.decode_steps - len(unread_at_read)) or read(self))
    ahead = completions(model, GenerationConfig(16, batch_size=5), prompts, eos, static=True, stats=stats)
    assert [c.tokens for c in ahead] == expected
    assert set(unread_at_read) == {1, 2} and stats.decode_steps == len(unread_at_read)
    assert unread_at_read.count(2) > unread_at_read.count(1)  # most reads find the next step launched


def test_without_kept_tokens_the_callback_sees_every_answer_and_the_run_returns_finishes_only(model):
    """`keep_tokens=False` (orlhf generate, whose writer takes answers as they end): memory
    holds the answers in flight only."""
    prompts = prompts_of_lengths(LENGTHS)
    cfg = GenerationConfig(12, batch_size=4)
    kept = completions(model, cfg, prompts, eos=5)
    seen = {}
    requests = [Request(p, stream_id(i, 0), cfg.max_new_tokens) for i, p in enumerate(prompts)]
    dropped = run(model, requests, cfg, 5, PAD, "cpu", keep_tokens=False,
                  on_token=lambda i, c: c.finish and seen.setdefault(i, list(c.tokens)))
    assert [seen[i] for i in range(len(prompts))] == [c.tokens for c in kept]
    assert [(c.tokens, c.finish) for c in dropped] == [([], c.finish) for c in kept]


def test_a_session_keeps_its_cache_and_step_across_runs_and_grows_when_a_run_needs_more(model, small_buckets):
    """A server's batches and PPO's iterations decode through one cache and step (on CUDA,
    the graphs captured by one run are replayed by the next), with the tokens of fresh runs."""
    cfg = GenerationConfig(8, batch_size=4)
    session = engine.DecodeSession(model, "cpu", cfg, static=True)
    prompts = prompts_of_lengths(LENGTHS)
    longer = GenerationConfig(16, batch_size=4)
    runs = [(cfg, prompts[3:7]), (cfg, prompts[:3]), (cfg, prompts[7:]), (longer, prompts[3:5])]
    steps = []
    for run_cfg, batch in runs:
        assert completions(model, run_cfg, batch, session=session) == completions(model, run_cfg, batch, static=True)
        steps.append(session.step)
    assert steps[0] is steps[1] is steps[2]  # the later runs fitted the first one's cache: 4 slots, 14 + 8 columns
    assert steps[3] is not steps[2] and (session.slots, session.width) == (4, 32)  # grew to 14 + 16, whole buckets
    for other_model, device in ((reference_model().eval(), "cpu"), (model, "meta")):
        with pytest.raises(ValueError, match=r"serves the model and device \(cpu\) it was made for"):
            run(other_model, [Request(prompts[0], 0, 4)], cfg, None, PAD, device, session=session)
