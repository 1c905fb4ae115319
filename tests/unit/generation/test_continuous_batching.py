"""Continuous batching: slots are refilled as answers end, n samples share a prefill, and
none of it changes a row's tokens (greedy) or a stream's draws (sampled)."""

from __future__ import annotations

import pytest
import torch

from offline_rlhf.config.schema import GenerationConfig
from offline_rlhf.generation import engine
from offline_rlhf.generation.engine import (
    Changes,
    EngineStats,
    Request,
    Room,
    cut_at_stop,
    generate,
    run,
)
from offline_rlhf.generation.kv_cache import LayerKVCache
from offline_rlhf.generation.sampling import Rule, stream_id
from tests.fixtures import reference_model
from tests.unit.generation.test_engine import PAD, greedy_without_cache, prompts_of_lengths

LENGTHS = [3, 9, 1, 6, 14, 2, 5, 11, 4]
SAMPLED = GenerationConfig(16, greedy=False, temperature=1.3, top_k=60, seed=4)


@pytest.fixture(scope="module")
def model():
    return reference_model().eval()


def test_more_prompts_than_slots_with_early_eos_match_decoding_each_prompt_alone(model):
    prompts = prompts_of_lengths(LENGTHS)
    full = [greedy_without_cache(model, p, 16) for p in prompts]
    eos = full[0][2]  # row 0 ends after three tokens; rows holding it elsewhere end there too
    expected = [row[:row.index(eos) + 1] if eos in row else row for row in full]
    stats = EngineStats()
    requests = [Request(p, stream_id(i, 0), 16) for i, p in enumerate(prompts)]
    completions = run(model, requests, GenerationConfig(16, batch_size=3), eos, PAD, "cpu", stats=stats)
    assert [c.tokens for c in completions] == expected
    assert [c.finish for c in completions] == ["eos" if eos in row else "length" for row in full]
    assert stats.admissions == len(prompts) > 3  # three slots served nine prompts: they were reused
    assert stats.decode_steps < sum(map(len, expected))  # rows decode side by side


def test_each_request_stops_at_its_own_max_new_tokens(model):
    prompts = prompts_of_lengths([4, 7, 2, 5])
    budgets = [1, 5, 3, 9]
    requests = [Request(p, stream_id(i, 0), budget) for i, (p, budget) in enumerate(zip(prompts, budgets))]
    completions = run(model, requests, GenerationConfig(9, batch_size=2), None, PAD, "cpu")
    assert [len(c.tokens) for c in completions] == budgets
    assert [c.tokens for c in completions] == [greedy_without_cache(model, p, b) for p, b in zip(prompts, budgets)]
    assert {c.finish for c in completions} == {"length"}


def test_a_stop_string_ends_the_answer_at_the_token_that_completes_it(model):
    prompt = prompts_of_lengths([6])[0]
    full = greedy_without_cache(model, prompt, 16)

    def decode(tokens):
        return "".join(f"<{t}>" for t in tokens)

    last_new = max(full.index(token) for token in full)  # the last token to appear for the first time
    assert last_new > 0
    stop = decode([full[last_new]])
    [completion] = run(model, [Request(prompt, 0, 16)], GenerationConfig(16, stop=[stop, "never"]), None, PAD, "cpu",
                       decode=decode)
    assert completion.tokens == full[:last_new + 1] and completion.finish == "stop"
    assert cut_at_stop(decode(completion.tokens), [stop]) == decode(full[:last_new])
    assert cut_at_stop("no stop here", ["<1>"]) == "no stop here"
    with pytest.raises(ValueError, match="stop strings need a `decode`"):
        run(model, [Request(prompt, 0, 16, stops=(stop,))], GenerationConfig(16), None, PAD, "cpu")


def test_each_row_ends_at_its_own_stop_strings_in_one_run(model):
    """Rows with different stop strings share a run: each ends where it ends alone; a row
    without its own (stops=None) takes the run's cfg.stop, one with stops=() has none."""
    prompts = prompts_of_lengths([6, 4, 7])
    fulls = [greedy_without_cache(model, p, 16) for p in prompts]

    def decode(tokens):
        return "".join(f"<{t}>" for t in tokens)

    def stop_at(full, index):
        return decode([full[index]]) if full[index] not in full[:index] else None

    stops = [next(s for i in range(2, 16) if (s := stop_at(full, i))) for full in fulls]
    cfg = GenerationConfig(16, stop=[stops[2]], batch_size=2)
    requests = [Request(prompts[0], 0, 16, stops=(stops[0],)), Request(prompts[1], 1, 16, stops=(stops[1], "never")),
                Request(prompts[2], 2, 16), Request(prompts[2], 3, 16, stops=())]
    completions = run(model, requests, cfg, None, PAD, "cpu", decode=decode)
    ends = [full.index(int(stop[1:-1])) + 1 for full, stop in zip(fulls, stops)]
    assert [c.tokens for c in completions] == [full[:end] for full, end in zip(fulls, ends)] + [fulls[2]]
    assert [c.finish for c in completions] == ["stop"] * 3 + ["length"]


def sampled_answers(model, prompts, ids, n, slots, stats=None):
    requests = [Request(p, stream_id(i, j), SAMPLED.max_new_tokens) for p, i in zip(prompts, ids) for j in range(n)]
    cfg = GenerationConfig(**{**SAMPLED.__dict__, "batch_size": slots})
    return [c.tokens for c in run(model, requests, cfg, None, PAD, "cpu", stats=stats)]


def test_n_samples_share_one_prefill_and_equal_recomputed_prefixes(model):
    prompts = prompts_of_lengths([5, 8, 3])
    shared_stats, alone_stats = EngineStats(), EngineStats()
    shared = sampled_answers(model, prompts, [0, 1, 2], n=4, slots=12, stats=shared_stats)
    alone = sampled_answers(model, prompts, [0, 1, 2], n=4, slots=1, stats=alone_stats)
    assert shared == alone
    assert (shared_stats.prompts_prefilled, alone_stats.prompts_prefilled) == (3, 12)
    assert len({tuple(answer) for answer in shared[:4]}) > 1  # the four samples of a prompt differ


def test_sampled_answers_depend_on_seed_prompt_and_sample_only(model):
    prompts = prompts_of_lengths(LENGTHS)
    ids = list(range(100, 100 + len(prompts)))
    reference = sampled_answers(model, prompts, ids, n=2, slots=4)
    assert sampled_answers(model, prompts, ids, n=2, slots=7) == reference
    # Two data-parallel replicas, each with its block of prompts and their global ids:
    halves = [sampled_answers(model, prompts[:4], ids[:4], 2, 4), sampled_answers(model, prompts[4:], ids[4:], 2, 4)]
    assert halves[0] + halves[1] == reference
    assert sampled_answers(model, prompts[::-1], ids[::-1], n=2, slots=4) == [
        answer for k in reversed(range(len(prompts))) for answer in reference[2 * k:2 * k + 2]]


def test_generate_keys_sampling_by_prompt_id(model):
    prompts = prompts_of_lengths([4, 6, 3, 7])
    whole = generate(model, prompts, SAMPLED, None, PAD, "cpu", prompt_ids=[10, 11, 12, 13])
    assert generate(model, prompts[2:], SAMPLED, None, PAD, "cpu", prompt_ids=[12, 13]) == whole[2:]


def test_requests_with_their_own_rules_share_a_run_and_decode_what_their_rules_give_alone(model):
    """A server's batch: greedy rows and rows sampled at their own temperature and top_p in
    one run, each answer the one a run of its rule alone gives."""
    prompts = prompts_of_lengths(LENGTHS[:6])
    rules = [Rule(), Rule(False, 1.3), Rule(False, 0.7, 0.8), Rule(), Rule(False, 1.0, 0.5), Rule(False, 1.3)]
    mixed = run(model, [Request(p, stream_id(i, 0), 10, rule) for i, (p, rule) in enumerate(zip(prompts, rules))],
                GenerationConfig(10, batch_size=4, seed=2), None, PAD, "cpu")
    for i, (prompt, rule) in enumerate(zip(prompts, rules)):
        cfg = GenerationConfig(10, greedy=rule.greedy, temperature=rule.temperature, top_p=rule.top_p, seed=2)
        [alone] = run(model, [Request(prompt, stream_id(i, 0), 10)], cfg, None, PAD, "cpu")
        assert mixed[i].tokens == alone.tokens, (i, rule)
    assert mixed[1].tokens != mixed[5].tokens  # same rule, other prompt and stream


def test_columns_no_slot_has_written_are_finite():
    """Decode attends (masked) over every column up to the longest slot's; those a slot never
    wrote must hold finite numbers, or NaN leaks through the mask into its answer."""
    cache = LayerKVCache(slots=3, max_len=8)
    k = torch.ones(1, 2, 4, 4)
    cache.write_prompts(torch.tensor([0]), k, k)
    assert torch.equal(cache.k[1:], torch.zeros_like(cache.k[1:]))
    assert torch.equal(cache.v[0, :, 4:], torch.zeros(2, 4, 4))


def test_on_token_sees_every_token_of_every_request_in_order_and_each_finish_once(model):
    prompts = prompts_of_lengths([4, 7, 2, 5, 3])
    seen: dict[int, list[int]] = {}
    finished: list[int] = []

    def on_token(index, completion):
        seen.setdefault(index, []).append(completion.tokens[-1])
        if completion.finish:
            finished.append(index)

    requests = [Request(p, stream_id(i, 0), 3 + i) for i, p in enumerate(prompts)]
    completions = run(model, requests, GenerationConfig(8, batch_size=2), None, PAD, "cpu", on_token=on_token)
    assert [seen[i] for i in range(len(prompts))] == [c.tokens for c in completions]
    assert sorted(finished) == list(range(len(prompts)))


def test_cancelled_requests_end_at_the_next_poll_and_queued_ones_never_start(model, monkeypatch):
    """A server's clients that left: the poll is asked every few decode steps; a running
    request it cancels ends ("abort") with the tokens it had, its slot goes to the queue,
    a queued one is never prefilled, and every other request decodes what it would alone."""
    monkeypatch.setattr(engine, "POLL_STEPS", 3)
    prompts = prompts_of_lengths(LENGTHS)
    alone = [greedy_without_cache(model, p, 16) for p in prompts]
    requests = [Request(p, stream_id(i, 0), 16) for i, p in enumerate(prompts)]
    running, queued = 4, 2  # longest prompts start first: 14 tokens (4) runs at the first poll, 1 (2) waits
    polls = []

    def poll(room):
        polls.append(stats.decode_steps)
        return Changes(cancelled={running, queued})

    stats = EngineStats()
    completions = run(model, requests, GenerationConfig(16, batch_size=3), None, PAD, "cpu", stats=stats,
                      poll=poll)
    assert [c.finish for c in completions] == ["abort" if i in (running, queued) else "length"
                                               for i in range(len(prompts))]
    assert completions[queued].tokens == [] and stats.admissions == len(prompts) - 1
    assert 0 < len(completions[running].tokens) < 16 and alone[running][:len(completions[running].tokens)] == \
        completions[running].tokens
    assert all(c.tokens == alone[i] for i, c in enumerate(completions) if i not in (running, queued))
    assert len(polls) >= 2 and all(3 <= later - before <= 6 for before, later in zip(polls, polls[1:]))  # 3 loop rounds


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_a_prompt_whose_logits_are_not_finite_is_an_error_not_a_token(greedy):
    """One prompt holds a token whose embedding is NaN: its logits are NaN from its first
    token on, and the run stops with an error naming the request instead of sampling a
    token from them."""
    model = reference_model().eval()
    with torch.no_grad():
        model.tok_embeddings.weight[7] = float("nan")
    prompts = [[1, 2, 3], [4, 7, 5], [6, 8]]
    requests = [Request(p, stream_id(i, 0), 6) for i, p in enumerate(prompts)]
    with pytest.raises(FloatingPointError, match="request 1 are not finite"):
        run(model, requests, GenerationConfig(6, greedy=greedy, batch_size=2), None, PAD, "cpu")


def test_requests_added_at_a_poll_join_the_running_batch_and_decode_what_they_would_alone(model, monkeypatch):
    """A server's requests that arrive while a batch runs: added at a poll, they take free
    slots at once (the run has every slot) or the next slot to free up, and each answer is
    the one its prompt gets alone; requests that would not fit the run's columns are for
    the caller to keep (the room refuses them)."""
    monkeypatch.setattr(engine, "POLL_STEPS", 2)
    prompts = prompts_of_lengths(LENGTHS)
    alone = [greedy_without_cache(model, p, 12) for p in prompts]
    first, later = prompts[:2], prompts[2:]
    requests = [Request(p, stream_id(i, 0), 12) for i, p in enumerate(first)]
    waiting = [Request(p, stream_id(i + 2, 0), 12) for i, p in enumerate(later)]
    refused = []

    def poll(room):
        added = []
        while waiting and len(added) < 3:  # a few per poll, as requests trickle in
            request = waiting.pop(0)
            (added if room.take(request) else refused).append(request)
        return Changes(added=added)

    stats = EngineStats()
    completions = run(model, requests, GenerationConfig(12, batch_size=4), None, PAD, "cpu", stats=stats, poll=poll)
    assert not refused and not waiting and [c.tokens for c in completions] == alone
    assert stats.admissions == len(prompts) and stats.prefills > 2  # they came in at several polls


def test_a_room_counts_the_longest_prompt_and_the_largest_budget_of_a_run():
    room = Room(columns=20, longest=5, largest_budget=8)
    assert room.take(Request([1] * 12, 0, 8)) and (room.longest, room.largest_budget) == (12, 8)
    assert not room.take(Request([1] * 3, 0, 9)) and room.largest_budget == 8  # 12 + 9 > 20: refused, not counted
    assert room.take(Request([1] * 2, 0, 8))
