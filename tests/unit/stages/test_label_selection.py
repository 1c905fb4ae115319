"""Keeping the best / worst of a prompt's n answers by reward (rejection sampling, pairs)."""

from __future__ import annotations

import pytest

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.samples import LabelInputConfig
from offline_rlhf.labeling.samples import Sample, selected_per_prompt

SAMPLES = [Sample("p", "a", "gen", "generated"), Sample("p", "b", "gen", "generated"),
           Sample("q", "c", "gen", "generated"), Sample("p", "d", "gen", "generated"),
           Sample("p", "human", "sft", "sft")]
REWARDS = [0.5, 2.0, -1.0, -3.0, 9.0]


@pytest.mark.parametrize("select,kept", [("all", [0, 1, 2, 3, 4]), ("best", [1, 2, 4]), ("worst", [2, 3, 4]),
                                         ("best_worst", [1, 2, 3, 4])])
def test_per_prompt_selection_keeps_the_extremes_and_other_inputs_whole(select, kept):
    assert list(selected_per_prompt(SAMPLES, REWARDS, {"gen": select, "sft": "all"})) == kept


def test_ties_keep_the_first_and_best_worst_of_one_answer_keeps_it_once():
    samples = [Sample("p", "a", "gen", "generated"), Sample("p", "b", "gen", "generated")]
    assert list(selected_per_prompt(samples, [1.0, 1.0], {"gen": "best"})) == [0]
    assert list(selected_per_prompt(samples[:1], [1.0], {"gen": "best_worst"})) == [0]


def test_selection_is_validated_per_input():
    with pytest.raises(ConfigError, match=r"inputs\[h\].select: applies to generated inputs, not sft"):
        LabelInputConfig(name="h", kind="sft", path="x.jsonl", select="best")
    with pytest.raises(ConfigError, match="unknown choice 'top'"):
        LabelInputConfig(name="g", path="x.jsonl", select="top")
