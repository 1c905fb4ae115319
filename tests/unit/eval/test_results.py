"""The evaluation table: paired differences, win/tie/loss with bootstrap intervals, and the
cut-off column, against values worked out by hand."""

import math

import pytest

from offline_rlhf.eval.results import results_markdown, summarize

SCORES = {"sft": {"gold": [0.0, 1.0, 2.0, 3.0]}, "dt": {"gold": [1.0, 1.0, 3.0, 2.5]}}


def test_summary_is_paired_against_the_baseline():
    table = summarize(SCORES, "sft", samples=200)
    dt = table["dt"]["gold"]
    assert dt["mean"] == 1.875 and dt["n"] == 4
    assert dt["difference"] == pytest.approx(1.875 - 1.5)
    diffs = [1.0, 0.0, 1.0, -0.5]  # dt - sft per prompt
    mean = sum(diffs) / 4
    assert dt["difference_stderr"] == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3 / 4))
    assert (dt["win"], dt["tie"], dt["loss"], dt["win_rate"]) == (0.5, 0.25, 0.25, 0.625)
    assert 0.0 <= dt["win_rate_low"] <= 0.625 <= dt["win_rate_high"] <= 1.0 and dt["win_rate_low"] < dt["win_rate_high"]
    sft = table["sft"]["gold"]
    assert (sft["difference"], sft["difference_stderr"], sft["tie"]) == (0.0, 0.0, 1.0)
    assert (sft["win_rate"], sft["win_rate_low"], sft["win_rate_high"]) == (0.5, 0.5, 0.5)
    assert summarize(SCORES, "sft", samples=200) == table  # seeded bootstrap


def test_markdown_shows_differences_intervals_and_cut_off_answers():
    table = summarize(SCORES, "sft", samples=200)
    text = results_markdown(table, "sft", {"sft": 3, "dt": 0})
    header, rule, sft, dt = text.splitlines()
    assert header == ("| model | gold mean ± s.e. | gold − sft ± paired s.e. | gold win rate vs sft [95% CI] | "
                      "cut off |")
    assert rule == "|---|---:|---:|---:|---:|"
    assert sft.startswith("| sft | 1.500 ± 0.645 | +0.000 ± 0.000 | 0.50 [0.50, 0.50] |") and sft.endswith(" 3/4 |")
    assert dt.startswith("| dt | 1.875 ± ") and "| +0.375 ± 0.375 | 0.62 [" in dt and dt.endswith(" 0/4 |")
    assert "cut off" not in results_markdown(table, "sft")
