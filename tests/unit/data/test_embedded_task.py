"""The embedded task: the gold-reward rule on hand-written cases, response qualities,
held-out prompts, exact quality mixes, Bradley-Terry label noise, determinism, config checks."""

import random
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.tools import TaskConfig
from offline_rlhf.data.embedded_task import (
    FAMILIES,
    FLAWS,
    HOLDOUT_CAP,
    QUALITIES,
    allocate,
    bt_probability,
    canonical_response,
    gold_reward,
    make_response,
    preference_rows,
    quality_mix,
    split_instructions,
)
from offline_rlhf.stages.task import EVAL_PROMPTS, GEN_PROMPTS, PREFERENCES, SFT, generate

# (instruction, response, gold reward by the documented rule)
CASES = {
    "add 3 and 5": [
        ("good", "3 plus 5 is 8.", 3.0),
        ("wrong", "3 plus 5 is 9.", 1.0),
        ("truncated", "3 plus 5 is", 0.0),
        ("off_topic", "the reverse is c b a.", -1.0),
        ("rambling", "3 plus um 5 is well 8.", 2.5),
    ],
    "reverse a b c": [
        ("good", "the reverse is c b a.", 3.0),
        ("wrong", "the reverse is a b c.", 1.0),
        ("truncated", "the reverse is c", 0.0),
        ("off_topic", "cat cat cat.", -1.0),
        ("rambling", "so the reverse is c b a.", 2.75),
    ],
    "repeat cat 3 times": [
        ("good", "cat cat cat.", 3.0),
        ("wrong", "cat cat.", 1.0),
        ("truncated", "cat cat", 0.0),
        ("off_topic", "there are 3 letters.", -1.0),
        ("rambling", "cat like cat uh cat actually.", 2.25),
    ],
    "count the letters in b d a": [
        ("good", "there are 3 letters.", 3.0),
        ("wrong", "there are 4 letters.", 1.0),
        ("truncated", "there are", 0.0),
        ("off_topic", "3 plus 5 is 8.", -1.0),
        ("rambling", "basically there are 3 letters.", 2.75),
    ],
}


@pytest.mark.parametrize("instruction,quality,response,expected",
                         [(i, q, r, g) for i, cases in CASES.items() for q, r, g in cases])
def test_gold_reward_hand_written_cases(instruction, quality, response, expected):
    assert gold_reward(instruction, response) == expected


@pytest.mark.parametrize("response,expected", [
    ("  3 plus 5 is 8.  ", 3.0),  # surrounding whitespace is ignored
    ("3 plus 5 is 8", 0.0),  # the right words without the period: unfinished
    ("3 plus 5 is 9", -1.0),  # unfinished and not a prefix of the right answer
    ("3 plus 5 is 8..", -1.0),  # malformed
    ("", -1.0),
    ("um uh", -1.5),  # only fillers: off topic, and each filler costs 0.25
])
def test_gold_reward_edge_cases(response, expected):
    assert gold_reward("add 3 and 5", response) == expected


def test_one_item_answers_are_off_topic_in_every_family():
    """Every reverse and repeat instruction has at least two items, and so do their response
    templates (was: a one-letter reverse was well formed, a one-word repeat off topic)."""
    assert gold_reward("reverse a c b c", "the reverse is d.") == -1.0
    assert gold_reward("repeat moon 4 times", "moon.") == -1.0
    assert gold_reward("reverse a c b c", "the reverse is c b d a.") == 1.0  # two or more: well formed


def test_gold_reward_rejects_unknown_instructions():
    with pytest.raises(ValueError, match="not an embedded-task instruction"):
        gold_reward("what color is the sky", "blue.")


def test_every_family_case_table_covers_every_quality():
    assert {family.name for family in FAMILIES} == {"add", "reverse", "repeat", "count"}
    assert all([quality for quality, _, _ in cases] == list(QUALITIES) for cases in CASES.values())


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_generated_qualities_score_as_designed_and_good_is_best(family):
    pools, _ = split_instructions(0, random.Random(0))
    rng = random.Random(1)
    for instruction in rng.sample(family.pool(), 50):
        scores = {quality: gold_reward(instruction, make_response(instruction, quality, pools, rng))
                  for quality in QUALITIES}
        assert make_response(instruction, "good", pools, rng) == canonical_response(instruction)
        assert (scores["good"], scores["wrong"], scores["truncated"], scores["off_topic"]) == (3.0, 1.0, 0.0, -1.0)
        assert scores["rambling"] in (2.25, 2.5, 2.75)
        assert all(scores["good"] > scores[flaw] for flaw in FLAWS)


def test_held_out_instructions_are_distinct_balanced_and_capped():
    pools, held_out = split_instructions(200, random.Random(3))
    assert len(held_out) == len(set(held_out)) == 200
    assert not set(held_out) & {instruction for pool in pools.values() for instruction in pool}
    per_family = Counter(instruction.split()[0] for instruction in held_out)
    for family in FAMILIES:
        assert per_family[family.name] <= len(family.pool()) * HOLDOUT_CAP
        assert len(pools[family.name]) + per_family[family.name] == len(family.pool())


def test_allocate_gives_exact_counts_from_the_mix():
    fractions = quality_mix(0.4, {"wrong": 1.0, "truncated": 1.0, "off_topic": 2.0})
    assert fractions == pytest.approx({"good": 0.4, "wrong": 0.15, "truncated": 0.15, "off_topic": 0.3,
                                       "rambling": 0.0})
    counts = Counter(allocate(101, fractions, random.Random(0)))
    assert sum(counts.values()) == 101 and "rambling" not in counts
    assert all(abs(counts[q] - 101 * fraction) < 1 for q, fraction in fractions.items())


def test_bt_probability_is_a_stable_sigmoid():
    assert bt_probability(1.0, 1.0, 0.5) == 0.5
    assert bt_probability(3.0, 2.0, 1.0) == pytest.approx(0.7310586)
    assert bt_probability(-1.0, 3.0, 1e-6) == 0.0 and bt_probability(3.0, -1.0, 1e-6) == 1.0


def _agreement(rows):
    return sum(row["chosen_gold_reward"] > row["rejected_gold_reward"] for row in rows) / len(rows)


@pytest.mark.parametrize("temperature,low,high", [(0.05, 0.98, 1.0), (100.0, 0.45, 0.56)])
def test_preference_labels_follow_the_gold_reward_with_bradley_terry_noise(temperature, low, high):
    pools, _ = split_instructions(0, random.Random(0))
    assert low <= _agreement(preference_rows(2000, temperature, pools, random.Random(5))) <= high


def test_preference_agreement_matches_the_bradley_terry_prediction():
    pools, _ = split_instructions(0, random.Random(0))
    rows = preference_rows(4000, 0.5, pools, random.Random(6))
    predicted = [bt_probability(abs(r["chosen_gold_reward"] - r["rejected_gold_reward"]), 0.0, 0.5) for r in rows]
    expected = sum(predicted) / len(rows)
    std_error = (sum(p * (1 - p) for p in predicted)) ** 0.5 / len(rows)
    assert abs(_agreement(rows) - expected) < 4 * std_error
    assert all(row["chosen_quality"] != row["rejected_quality"] for row in rows)


SMALL = TaskConfig(n_sft=500, n_preferences=300, n_gen_prompts=100, n_eval_prompts=60)


def test_generate_is_deterministic_per_seed():
    assert generate(SMALL) == generate(replace(SMALL))
    other = generate(replace(SMALL, seed=1))
    assert all(other[name] != rows for name, rows in generate(SMALL).items())


def test_eval_prompts_are_held_out_from_every_other_file():
    files = generate(SMALL)
    eval_prompts = {row["prompt"] for row in files[EVAL_PROMPTS]}
    assert len(eval_prompts) == SMALL.n_eval_prompts
    for name in (SFT, PREFERENCES, GEN_PROMPTS):
        assert not eval_prompts & {row["prompt"] for row in files[name]}


def test_sft_quality_fractions_follow_the_config():
    rows = generate(SMALL)[SFT]
    counts = Counter(row["quality"] for row in rows)
    assert counts["good"] == 200 and all(counts[flaw] == 75 for flaw in FLAWS)
    assert all(row["gold_reward"] == gold_reward(row["prompt"], row["response"]) for row in rows)


@pytest.mark.parametrize("field,value,key", [
    ("n_sft", 0, "n_sft"),
    ("n_eval_prompts", 10**6, "n_eval_prompts"),
    ("good_fraction", 1.5, "good_fraction"),
    ("flaw_weights", {"sloppy": 1.0}, "flaw_weights.sloppy"),
    ("flaw_weights", {"wrong": 0.0}, "flaw_weights"),
    ("bt_temperature", 0.0, "bt_temperature"),
    ("vocab_size", 100, "vocab_size"),
])
def test_config_errors_name_the_key(field, value, key):
    with pytest.raises(ConfigError) as err:
        TaskConfig(**{field: value})
    assert err.value.key == key


def test_the_task_stage_imports_no_torch():
    code = "import sys, offline_rlhf.stages.task; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
