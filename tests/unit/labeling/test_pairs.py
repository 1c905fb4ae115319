"""Preference pairs from labeled samples: best vs worst per prompt with a minimum reward
gap, ties and one-sample prompts skipped and counted; human pairs kept as ranked."""

import pytest

from offline_rlhf.data.errors import DataError
from offline_rlhf.labeling.pairs import HUMAN, RANKED, build_pairs, human_pairs, ranked_pairs


def generated(prompt, response, reward, source="generated", **extra):
    return {"prompt": prompt, "response": response, "kind": "generated", "source": source, "reward": reward,
            "reward_raw": reward, **extra}


def side(kind, pair, response, reward, source="hh"):
    return {"prompt": f"q{pair}", "response": response, "kind": kind, "source": source, "pair": pair,
            "reward": reward, "reward_raw": reward}


RECORDS = [
    generated("a", "a1", 0.2), generated("a", "a2", 1.5), generated("a", "a3", -0.9), generated("a", "a4", 0.0),
    generated("b", "b1", 0.3),  # one sample
    generated("c", "c1", 0.7), generated("c", "c2", 0.7), generated("c", "c3", 0.7),  # all tied
    generated("d", "d1", 0.1), generated("d", "d2", 0.4),  # gap 0.3 < 0.5
    generated("e", "same", -1.0, finished=False), generated("e", "e2", 2.0),  # cut-off worst answer
    generated("f", "same text", 1.0), generated("f", "same text", 0.2, finished=False),  # same text: a tie
    generated("a", "other input's a", 3.0, source="round2"),  # another input: its own prompt group
]


def test_best_vs_worst_with_gap_threshold_ties_and_single_samples_counted():
    pairs, counts = ranked_pairs(RECORDS, min_gap=0.5)
    assert counts == {"prompts": 7, "pairs": 2, "single_sample": 2, "tie": 2, "below_gap": 1}
    assert counts["prompts"] == sum(v for k, v in counts.items() if k != "prompts")
    first, second = pairs
    assert (first.example.prompt, first.example.chosen, first.example.rejected) == ("a", "a2", "a3")
    assert (first.chosen_reward, first.rejected_reward, first.origin) == (1.5, -0.9, RANKED)
    assert (second.example.chosen, second.example.rejected) == ("e2", "same")
    assert second.example.chosen_finished and not second.example.rejected_finished
    record = second.record()
    assert record["rejected_finished"] is False and "chosen_finished" not in record


def test_min_gap_zero_keeps_any_positive_gap_but_never_a_tie():
    _, counts = ranked_pairs(RECORDS, min_gap=0.0)
    assert counts["pairs"] == 3 and counts["below_gap"] == 0 and counts["tie"] == 2
    _, at_gap = ranked_pairs(RECORDS, min_gap=2.4)  # a gap equal to min_gap passes (a: 2.4, e: 3.0)
    assert at_gap["pairs"] == 2 and at_gap["below_gap"] == 1
    _, stricter = ranked_pairs(RECORDS, min_gap=2.41)
    assert stricter["pairs"] == 1 and stricter["below_gap"] == 2


def test_human_pairs_keep_the_human_order_even_against_the_rm():
    records = [side("chosen", 0, "good", -2.0), side("rejected", 0, "bad", 1.0),
               side("rejected", 1, "only one side", 0.0), generated("x", "y", 0.0)]
    pairs, counts = human_pairs(records)
    assert counts == {"pairs": 1, "incomplete": 1}
    [pair] = pairs
    assert (pair.example.prompt, pair.example.chosen, pair.example.rejected) == ("q0", "good", "bad")
    assert (pair.origin, pair.source, pair.chosen_reward) == (HUMAN, "hh", -2.0)


def test_build_pairs_mixes_sources_by_weight_and_counts_in_the_card():
    human = [rec for i in range(6) for rec in (side("chosen", i, f"c{i}", 0.0), side("rejected", i, f"r{i}", 0.0))]
    pairs, card = build_pairs(RECORDS + human, 0.5, {RANKED: 1.0, HUMAN: 1.0}, None, 7, "labeled.jsonl")
    assert len(pairs) == card["pairs"] == 8
    assert card["groups"][RANKED]["taken"] == 2 and card["groups"][HUMAN]["taken"] == 6
    assert card["rm_ranked"]["single_sample"] == 2 and card["human"]["pairs"] == 6
    weighted, card = build_pairs(RECORDS + human, 0.5, {RANKED: 3.0, HUMAN: 1.0}, 8, 7, "labeled.jsonl")
    assert card["groups"][RANKED] == {"available": 2, "taken": 6, "repeated": 4}
    assert sum(p.origin == HUMAN for p in weighted) == 2
    only_human, card = build_pairs(RECORDS + human, 0.5, {RANKED: 0.0, HUMAN: 1.0}, None, 7, "labeled.jsonl")
    assert {p.origin for p in only_human} == {HUMAN} and list(card["groups"]) == [HUMAN]
    again, _ = build_pairs(RECORDS + human, 0.5, {RANKED: 1.0, HUMAN: 1.0}, None, 7, "labeled.jsonl")
    assert [p.record() for p in again] == [p.record() for p in pairs]  # seeded


def test_no_usable_pair_is_an_error_naming_the_input_and_the_counts():
    with pytest.raises(DataError, match=r"labeled.jsonl: expected a pair .*'single_sample': 1"):
        build_pairs([generated("a", "a1", 0.0)], 0.5, {RANKED: 1.0, HUMAN: 1.0}, None, 0, "labeled.jsonl")
