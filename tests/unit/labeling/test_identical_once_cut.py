"""Answers the reward model's length limit makes identical: one candidate for best/worst
selection (never a best and a worst that are one scored sequence), and counted."""

from __future__ import annotations

from offline_rlhf.labeling.samples import ONLY, Sample, identical_once_cut, selected_per_prompt

# Prompt p: three different texts, the first two cut to one sequence; prompt q: two texts cut
# to one sequence (left with one candidate); prompt r: two texts scored apart.
SAMPLES = [Sample(prompt, text, "gen", "generated") for prompt, text in (
    ("p", "long answer, then A"), ("p", "long answer, then B"), ("p", "short"), ("p", "long answer, then A"),
    ("q", "same start, 1"), ("q", "same start, 2"), ("r", "yes"), ("r", "no"))]
SEQUENCES = [(1, 2, 3), (1, 2, 3), (1, 4), (1, 2, 3), (5, 6), (5, 6), (7,), (8,)]


def test_answers_cut_to_one_sequence_are_one_candidate_whatever_their_rewards_last_bits():
    for noise in (0.0, 2.4e-7, -1e-7):
        rewards = [0.3, 0.3 + noise, -1.0, 0.3, 0.5, 0.5 - noise, 1.0, -1.0]
        marks = selected_per_prompt(SAMPLES, rewards, {"gen": "best_worst"}, SEQUENCES)
        assert marks == {0: "best", 2: "worst", 4: ONLY, 6: "best", 7: "worst"}, noise
    # Without the sequences, texts tell answers apart (as before): q's two texts are best and worst.
    assert selected_per_prompt(SAMPLES, [0.3, 0.3, -1.0, 0.3, 0.5, 0.5 - 1e-7, 1.0, -1.0],
                               {"gen": "best_worst"}) == {0: "best", 2: "worst", 4: "best", 5: "worst", 6: "best",
                                                          7: "worst"}


def test_identical_once_cut_counts_answers_prompts_and_human_pairs():
    assert identical_once_cut(SAMPLES, SEQUENCES, {"gen": "best"}) == {"answers": 2, "prompts": 1, "pairs": 0}
    assert identical_once_cut(SAMPLES, SEQUENCES, {"gen": "all"}) == {"answers": 0, "prompts": 0, "pairs": 0}
    pairs = [Sample("x", "chosen, cut", "human", "chosen", 0), Sample("x", "rejected, cut", "human", "rejected", 0),
             Sample("y", "good", "human", "chosen", 1), Sample("y", "bad", "human", "rejected", 1)]
    assert identical_once_cut(SAMPLES + pairs, SEQUENCES + [(9, 9), (9, 9), (1,), (2,)], {"gen": "best"}) == \
        {"answers": 2, "prompts": 1, "pairs": 1}


def test_ties_among_answers_cut_apart_still_go_to_the_first():
    samples = [Sample("p", text, "gen", "generated") for text in ("a", "b", "c", "d")]
    sequences = [(1,), (2,), (1,), (3,)]  # c is a's copy once cut
    assert selected_per_prompt(samples, [0.0, 0.0, 5.0, 0.0], {"gen": "best_worst"}, sequences) == {0: ONLY}
    assert selected_per_prompt(samples, [1.0, 2.0, 9.0, 2.0], {"gen": "best_worst"}, sequences) == \
        {0: "worst", 1: "best"}
