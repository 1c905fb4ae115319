"""What a reviewer found labeling and mixing at scale: `max_samples` on n answers per prompt
draws whole prompts; copies of one answer are one candidate for best/worst, whatever the
rewards' last bits; the mix says which group it repeats; labeled rows keep the generated
record's provenance; duplicate input names and bad mix weights are config errors."""

import json
import random
from dataclasses import replace

import pytest

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.samples import LabelConfig, LabelInputConfig, MixConfig, MixWeights
from offline_rlhf.data.alignment_dataset import read_labeled
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.labeling.mix import card, card_markdown, draw, read_labeled_records, repetition_notes
from offline_rlhf.labeling.normalize import labeled_records
from offline_rlhf.labeling.pairs import ranked_pairs
from offline_rlhf.labeling.samples import ONLY, Sample, read_samples, selected_per_prompt


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def generated(prompts, n):
    """What `orlhf generate` writes for `prompts` prompts of `n` sampled answers each."""
    return [{"schema": 3, "id": f"task-{p}", "sample": s, "prompt": f"prompt {p}", "response": f"answer {p}.{s}",
             "source": "task", "model": "runs/x/sft", "finished": True, "finish_reason": "eos",
             "response_tokens": 3, "prompt_truncated": p == 0} for p in range(prompts) for s in range(n)]


def test_max_samples_of_a_generated_input_draws_whole_prompts(tmp_path):
    path = write_jsonl(tmp_path / "samples.jsonl", generated(40, 4))
    samples = read_samples("gen", "generated", "jsonl", path, ChatTemplate(), 10, 7)
    by_prompt = {}
    for sample in samples:
        by_prompt.setdefault(sample.prompt, []).append(sample.response)
    assert len(by_prompt) == 10 and all(len(answers) == 4 for answers in by_prompt.values())
    assert samples == read_samples("gen", "generated", "jsonl", path, ChatTemplate(), 10, 7)  # seeded
    assert set(by_prompt) != {s.prompt for s in read_samples("gen", "generated", "jsonl", path, ChatTemplate(), 10, 8)}
    # One answer per prompt: the records the draw of records took before (file order).
    single = write_jsonl(tmp_path / "single.jsonl", generated(40, 1))
    drawn = sorted(random.Random(7).sample(range(40), 10))
    assert [s.prompt for s in read_samples("gen", "generated", "jsonl", single, ChatTemplate(), 10, 7)] == \
        [f"prompt {i}" for i in drawn]


def test_copies_of_one_answer_are_one_candidate_whatever_their_rewards_last_bits():
    """Four identical answers scored at another batch size differ by ~1e-7: never a best and a worst."""
    dots = [Sample("p", ".", "gen", "generated") for _ in range(4)]
    other = [Sample("q", "yes", "gen", "generated"), Sample("q", "no", "gen", "generated"),
             Sample("q", "yes", "gen", "generated")]
    for noise in ([0.0, 0.0, 0.0, 0.0], [0.0, 2.4e-7, -1e-7, 0.0]):
        rewards = [0.3 + e for e in noise] + [1.0, -1.0, -2.0]  # the second "yes" is a copy: not the worst
        for select in ("best", "worst", "best_worst"):
            marks = selected_per_prompt(dots + other, rewards, {"gen": select})
            assert marks[0] == ONLY and not {1, 2, 3} & set(marks), (select, noise)
            assert {i: m for i, m in marks.items() if i > 3} == {"best": {4: "best"}, "worst": {5: "worst"},
                                                                 "best_worst": {4: "best", 5: "worst"}}[select]
    assert selected_per_prompt(other, [1.0, 1.0, 1.0], {"gen": "best_worst"}) == {0: ONLY}  # all tied
    assert selected_per_prompt(other, [1.0, -1.0, 2.0], {}) == {0: None, 1: None, 2: None}  # select: all


def test_labeled_rows_keep_the_generated_provenance_and_mix_and_align_read_them(tmp_path):
    path = write_jsonl(tmp_path / "samples.jsonl", generated(2, 2))
    samples = read_samples("gen", "generated", "jsonl", path, ChatTemplate(), None, 0)
    marks = selected_per_prompt(samples, [0.5, -0.5, 0.1, 0.2], {"gen": "best_worst"})
    kept = [replace(samples[i], selected=mark) for i, mark in marks.items()]
    records = labeled_records(kept, [0.5, -0.5, 0.1, 0.2], [1.0, -1.0, 0.2, 0.4])
    assert [(r["id"], r["sample"], r["selected"]) for r in records] == [("task-0", 0, "best"), ("task-0", 1, "worst"),
                                                                         ("task-1", 0, "worst"), ("task-1", 1, "best")]
    assert records[0]["model"] == "runs/x/sft" and records[0]["finish_reason"] == "eos"
    assert records[0]["prompt_truncated"] is True and records[2]["prompt_truncated"] is False
    source = {(r["id"], r["sample"]): r for r in map(json.loads, open(path))}
    assert all(source[r["id"], r["sample"]]["response"] == r["response"] for r in records)  # rows join back
    labeled = write_jsonl(tmp_path / "labeled.jsonl", records)
    assert read_labeled_records(labeled) == records  # `orlhf mix` and `orlhf reference` copy them on
    assert [e.response for e in read_labeled(labeled)] == [r["response"] for r in records]  # `orlhf align`
    _, counts = ranked_pairs(records, 0.5)
    assert counts["pairs"] == 1 and counts["below_gap"] == 1


def labeled_mix(generated_n, sft_n, pairs_n):
    rows = [{"prompt": f"g{i}", "response": "a", "kind": "generated", "source": "gen", "reward": 0.0}
            for i in range(generated_n)]
    rows += [{"prompt": f"s{i}", "response": "a", "kind": "sft", "source": "demos", "reward": 0.0}
             for i in range(sft_n)]
    rows += [{"prompt": f"p{i}", "response": side, "kind": side, "source": "pairs", "pair": i, "reward": 0.0}
             for i in range(pairs_n) for side in ("chosen", "rejected")]
    return rows


def test_the_mix_says_which_group_it_repeats_and_how_often():
    """The demo's proportions: 5640 generated, 600 SFT samples and 300 pairs (unchanged draw)."""
    cfg = MixConfig(input="labeled.jsonl")
    mixed, stats = draw(cfg, labeled_mix(5640, 600, 300))
    assert len(mixed) == 16920 and stats["sft"]["taken"] == 5640 and stats["preference"]["taken"] == 2820
    assert (stats["generated"]["repetition"], stats["sft"]["repetition"], stats["preference"]["repetition"]) == \
        (1.0, 9.4, 9.4)
    assert repetition_notes(stats) == [
        "mix: sft repeated 9.4x (600 available, 5640 drawn); lower weights.sft or total to repeat less",
        "mix: preference repeated 9.4x (300 pairs available, 2820 drawn); lower weights.preference or total to "
        "repeat less"]
    assert "| sft | 600 | 5640 | 5040 | 9.40x |" in card_markdown(card(mixed, stats, cfg))
    _, enough = draw(MixConfig(input="labeled.jsonl", total=90), labeled_mix(60, 60, 30))
    assert repetition_notes(enough) == [] and enough["sft"]["repetition"] == 0.5


def test_without_a_total_every_generated_sample_is_kept_and_the_others_take_their_weights_share():
    """total=None: the generated group is drawn once, whatever its weight, and sets the
    scale. 30 generated, 10 SFT samples, 5 pairs; weights 2, 1, 2 (a pair unit: 2 / 2 = 1):
    units = 30 * (2 + 1 + 1) / 2 = 60, of which 30 generated, 15 SFT and 15 pairs."""
    cfg = MixConfig(input="labeled.jsonl", weights=MixWeights(generated=2, sft=1, preference=2))
    mixed, stats = draw(cfg, labeled_mix(30, 10, 5))
    assert [(stats[g]["available"], stats[g]["taken"]) for g in ("generated", "sft", "preference")] == \
        [(30, 30), (10, 15), (5, 15)]
    assert len(mixed) == 30 + 15 + 2 * 15


@pytest.mark.parametrize("weights, generated_n", [(MixWeights(), 0), (MixWeights(generated=0), 40)])
def test_without_a_total_or_generated_samples_the_other_groups_are_drawn_in_their_shares(weights, generated_n):
    """No generated group (none given, or weight 0) and total=None: as many units as the
    groups hold together, 8 SFT samples + 4 pairs = 12, shared by weight 1 : 0.5 (a pair
    unit counts half): 8 SFT samples and 4 pairs, each taken once."""
    mixed, stats = draw(MixConfig(input="labeled.jsonl", weights=weights), labeled_mix(generated_n, 8, 4))
    assert (stats["sft"]["taken"], stats["preference"]["taken"]) == (8, 4)
    assert len(mixed) == 8 + 2 * 4 and {record["kind"] for record in mixed} == {"sft", "chosen", "rejected"}


def test_duplicate_label_input_names_are_refused():
    inputs = [LabelInputConfig(name="gen", path="a.jsonl", select="best"), LabelInputConfig(name="gen", path="b.jsonl")]
    with pytest.raises(ConfigError, match=r"^inputs\[gen\].name: names two inputs; give each input its own name"):
        LabelConfig(rm="rm", inputs=inputs)
    unnamed = [LabelInputConfig(path="a.jsonl"), LabelInputConfig(name="x", path="b.jsonl"),
               LabelInputConfig(path="a.jsonl")]
    with pytest.raises(ConfigError, match=r"^inputs\[a.jsonl\].name: names two inputs"):
        LabelConfig(rm="rm", inputs=unnamed)
    LabelConfig(rm="rm", inputs=unnamed[:2])
    with pytest.raises(ConfigError, match=r"^inputs\[gen\].max_samples: must be >= 1 or null, got 0"):
        LabelInputConfig(name="gen", path="a.jsonl", max_samples=0)


@pytest.mark.parametrize("weights, error", [
    (MixWeights(generated=-1), "weights.generated: must be >= 0, got -1"),
    (MixWeights(sft=-0.5), "weights.sft: must be >= 0, got -0.5"),
    (MixWeights(generated=0, sft=0, preference=0), "weights: are all 0; give weights.generated, weights.sft or "
                                                   "weights.preference a positive share"),
])
def test_mix_weights_name_their_key(weights, error):
    with pytest.raises(ConfigError) as raised:
        MixConfig(input="labeled.jsonl", weights=weights)
    assert str(raised.value) == error
