"""`orlhf pipeline` (what `make demo` runs): the whole offline RLHF chain on the embedded
task, every artifact, a rerun that skips finished stages, and the alignment result.

Sizes and seeds are the demo's defaults (conf/pipeline/demo.yaml, conf/model/demo.yaml,
offline_rlhf/config/task.py): seed 0 task with 2000 demonstrations (40% good), 2000
preference pairs, 600 generation and 200 held-out evaluation prompts; a 0.8M-parameter
model; evaluation samples at temperature 1 with generation seed 0.
"""

import json
import math
import statistics

import pytest

from offline_rlhf.checkpoint import latest_checkpoint, read_meta
from offline_rlhf.cli import main
from offline_rlhf.ledger import read_ledger

STAGES = ["task", "sft", "rm", "generate", "label", "mix", "align_mle_filter", "align_rwr", "align_dt", "eval",
          "report"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    assert main(["pipeline", f"run_dir={run_dir}"]) == 0
    return run_dir


def gold_scores(run_dir, model):
    path = run_dir / "eval" / f"answers_{model}.jsonl"
    return [json.loads(line)["gold"] for line in path.read_text().splitlines()]


def paired_difference(a, b):
    """Mean of a - b over the same prompts and its standard error."""
    diff = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.fmean(diff), statistics.stdev(diff) / math.sqrt(len(diff))


def test_every_stage_leaves_its_artifacts(demo_run):
    for stage in STAGES:
        assert (demo_run / stage / "DONE").exists(), stage
        assert (demo_run / stage / "config.yaml").exists(), stage
    for stage in ("sft", "rm", "align_mle_filter", "align_rwr", "align_dt"):
        assert latest_checkpoint(demo_run / stage / "checkpoints") is not None, stage
        assert (demo_run / stage / "metrics.jsonl").stat().st_size > 0, stage
    assert "reward_stats" in read_meta(latest_checkpoint(demo_run / "rm" / "checkpoints")).metadata
    assert len((demo_run / "generate" / "samples.jsonl").read_text().splitlines()) == 600
    assert (demo_run / "label" / "reward_histogram.png").exists()
    assert json.loads((demo_run / "label" / "labels_meta.json").read_text())["normalization"] == "labeled_set"
    card = json.loads((demo_run / "mix" / "dataset_card.json").read_text())
    assert card["groups"]["generated"]["taken"] == 600 and card["samples"] == 1800
    report = json.loads((demo_run / "report.json").read_text())
    assert [row["method"] for row in report["table3"]] == ["dt", "mle_filter", "rwr"]
    assert all(row["total"] > row["alignment"] > 0 for row in report["table3"])
    text = (demo_run / "report.md").read_text()
    for section in ("## Evaluation", "## Device-hours per method", "## Reward distribution", "## Loss curves"):
        assert section in text
    assert (demo_run / "report" / "loss_curves.png").exists()
    assert {row.stage for row in read_ledger(demo_run)} >= set(STAGES) - {"task"}


def test_rerun_skips_finished_stages(demo_run, capsys):
    rows_before = len(read_ledger(demo_run))
    assert main(["pipeline", f"run_dir={demo_run}"]) == 0
    out = capsys.readouterr().out
    assert out.count("already complete, skipped") == len(STAGES)
    assert len(read_ledger(demo_run)) == rows_before


def test_dt_beats_sft_on_the_gold_reward(demo_run):
    mean, stderr = paired_difference(gold_scores(demo_run, "dt"), gold_scores(demo_run, "sft"))
    assert mean > 2 * stderr, (mean, stderr)


def test_dt_follows_its_target_score(demo_run):
    mean, stderr = paired_difference(gold_scores(demo_run, "dt"), gold_scores(demo_run, "dt_low"))
    assert mean > 2 * stderr, (mean, stderr)
