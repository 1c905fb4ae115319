"""`orlhf pipeline` (what `make demo` runs): the whole offline RLHF chain and the PPO
baseline on the embedded task, every artifact, a rerun that skips finished stages, the
alignment result and a report that sets every method, PPO included, side by side.

Sizes and seeds are the demo's defaults (conf/pipeline/demo.yaml, conf/model/demo.yaml,
offline_rlhf/config/task.py): seed 0 task with 2000 demonstrations (40% good), 2000
preference pairs, 600 generation prompts (4 sampled answers each, seed 1) and 200 held-out
evaluation prompts; a 0.8M-parameter model; DPO on the RM-ranked best/worst pairs; PPO 40
iterations of 64 answers; evaluation samples 8 answers per prompt at temperature 1 with
generation seed 0.
"""

import json
import math
import statistics

import pytest

from offline_rlhf.checkpoint import latest_checkpoint, read_meta
from offline_rlhf.cli import main
from offline_rlhf.ledger import read_ledger

STAGES = ["task", "sft", "rm", "generate", "label", "mix", "align_mle_filter", "align_rwr", "align_dt", "reference",
          "align_dpo", "ppo", "eval", "report"]
PPO_MODULES = {"ppo_actor", "ppo_critic", "ppo_reference", "ppo_reward"}  # the ledger rows of the `ppo` stage


# The stages other tests start from too (conftest.DemoStages: run once a session): `orlhf
# pipeline` here runs the others after them and skips these, complete in a moved run folder.
SHARED = ("task", "sft", "rm", "generate", "label", "mix", "align_dt", "ppo")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_stages):
    run_dir = demo_stages.copy_to(tmp_path_factory.mktemp("demo") / "run", SHARED)
    copied = len(read_ledger(run_dir))
    assert main(["pipeline", f"run_dir={run_dir}"]) == 0
    ran = {row.stage for row in read_ledger(run_dir)[copied:]}
    assert ran.isdisjoint({*SHARED, *PPO_MODULES}), f"copied stages ran again: {sorted(ran)}"
    return run_dir


def answer_scores(run_dir, model, score: str = "gold"):
    """Per prompt, the mean score of its sampled answers (eval's generation.n, in order)."""
    path = run_dir / "eval" / f"answers_{model}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    n = 1 + max(record["sample"] for record in records)
    return [statistics.fmean(r[score] for r in records[at:at + n]) for at in range(0, len(records), n)]


def paired_difference(a, b):
    """Mean of a - b over the same prompts and its standard error."""
    diff = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.fmean(diff), statistics.stdev(diff) / math.sqrt(len(diff))


def test_every_stage_leaves_its_artifacts(demo_run):
    for stage in STAGES:
        assert (demo_run / stage / "DONE").exists(), stage
        # The stage writes its resolved config where its runtime lives (PPO's: its actor's).
        assert (demo_run / ("ppo_actor" if stage == "ppo" else stage) / "config.yaml").exists(), stage
    for stage in ("sft", "rm", "align_mle_filter", "align_rwr", "align_dt", "align_dpo", "ppo"):
        assert latest_checkpoint(demo_run / stage / "checkpoints") is not None, stage
        assert (demo_run / stage / "metrics.jsonl").stat().st_size > 0, stage
    assert "reward_stats" in read_meta(latest_checkpoint(demo_run / "rm" / "checkpoints")).metadata
    assert len((demo_run / "generate" / "samples.jsonl").read_text().splitlines()) == 2400  # 4 per prompt
    assert (demo_run / "label" / "reward_histogram.png").exists()
    assert json.loads((demo_run / "label" / "labels_meta.json").read_text())["normalization"] == "labeled_set"
    card = json.loads((demo_run / "mix" / "dataset_card.json").read_text())
    labeled = json.loads((demo_run / "label" / "labels_meta.json").read_text())
    # the best and the worst answer of each prompt (one when all four answers are alike)
    assert 600 < labeled["by_source"]["generated:generated"] <= 1200
    blank = sum(labeled["skipped"]["generated"].values())  # answers skipped before best/worst selection
    assert labeled["not_selected"] == 2400 - blank - labeled["by_source"]["generated:generated"]
    assert card["groups"]["generated"]["taken"] == labeled["by_source"]["generated:generated"]
    groups = card["groups"]  # preference pairs count as two samples (chosen and rejected)
    assert card["samples"] == groups["generated"]["taken"] + groups["sft"]["taken"] + 2 * groups["preference"]["taken"]
    pairs = json.loads((demo_run / "reference" / "dataset_card.json").read_text())
    assert 0 < pairs["pairs"] <= 600
    text = (demo_run / "report.md").read_text()
    for section in ("## Methods side by side", "## Device-hours per method", "## Reward distribution",
                    "## Loss curves"):
        assert section in text
    for figure in ("loss_curves.png", "device_hours_and_quality.png"):
        assert (demo_run / "report" / figure).read_bytes().startswith(b"\x89PNG"), figure
    assert {row.stage for row in read_ledger(demo_run)} >= set(STAGES) - {"task", "ppo"} | PPO_MODULES


def test_rerun_skips_finished_stages(demo_run, capsys):
    rows_before = len(read_ledger(demo_run))
    assert main(["pipeline", f"run_dir={demo_run}"]) == 0
    out = capsys.readouterr().out
    assert out.count("already complete, skipped") == len(STAGES)
    assert len(read_ledger(demo_run)) == rows_before


def test_report_sets_every_method_against_ppo(demo_run):
    report = json.loads((demo_run / "report.json").read_text())
    costs = {row["method"]: row for row in report["table3"]}
    assert list(costs) == ["dpo", "dt", "mle_filter", "rwr", "ppo"]
    assert set(costs["ppo"]["stages"]) == PPO_MODULES and all(v > 0 for v in costs["ppo"]["stages"].values())
    assert costs["ppo"]["total"] == pytest.approx(sum(costs["ppo"]["stages"].values()))
    for method in ("dt", "mle_filter", "rwr"):
        assert set(costs[method]["stages"]) == {"generate", "label", "mix", f"align_{method}"}
        assert costs[method]["total"] > costs[method]["training"] > 0
        assert costs[method]["share_of_ppo"] == pytest.approx(costs[method]["total"] / costs["ppo"]["total"])
    assert set(costs["dpo"]["stages"]) == {"generate", "label", "reference", "align_dpo"}
    methods = {entry["model"]: entry for entry in report["methods"]}
    ppo = methods["ppo"]
    assert ppo["quality"]["gold"]["n"] == 200 and ppo["quality"]["gold"]["mean"] == pytest.approx(
        statistics.fmean(answer_scores(demo_run, "ppo")))
    assert set(ppo["quality"]) == {"gold", "rm"} and ppo["device_hours"] == costs["ppo"]["total"] > 0
    assert ppo["share_of_ppo"] == 1.0 and methods["dt"]["share_of_ppo"] < 1.0
    assert methods["dpo"]["quality"]["gold"]["n"] == 200 and methods["dpo"]["device_hours"] == costs["dpo"]["total"]
    assert set(report["shared_device_hours"]) == {"sft", "rm", "total"} and methods["sft"]["device_hours"] is None
    side = (demo_run / "report.md").read_text().split("## Methods side by side", 1)[1].split("\n## ", 1)[0]
    assert next(line for line in side.splitlines() if line.startswith("| ppo |")).endswith(" | 100.0% |")
    assert "no judge configured" in side


def test_dt_answers_at_the_target_its_checkpoint_records(demo_run):
    models = json.loads((demo_run / "eval" / "results.json").read_text())["models"]
    assert (models["dt"]["reward_prompt"], models["dt"]["reward_prompt_from"]) == (1.5, "checkpoint")
    assert (models["dt_low"]["reward_prompt"], models["dt_low"]["reward_prompt_from"]) == (-1.5, "config")


def test_dt_raises_the_reward_models_score_and_is_no_worse_than_sft_on_the_gold_reward(demo_run):
    """DT answers what its reward prompt asks of the reward model it was labeled by, far
    above SFT. On the gold reward its gain over SFT on this toy task lies within the
    evaluation's noise (docs/benchmarks.md: -0.01 to +0.13 over sampling seeds of one run,
    +0.29 in an earlier version's), so only a DT worse than SFT beyond that noise fails."""
    mean, stderr = paired_difference(answer_scores(demo_run, "dt", "rm"), answer_scores(demo_run, "sft", "rm"))
    assert mean > 2 * stderr, (mean, stderr)
    mean, stderr = paired_difference(answer_scores(demo_run, "dt"), answer_scores(demo_run, "sft"))
    assert mean > -2 * stderr, (mean, stderr)


@pytest.mark.parametrize("method", ["ppo", "dpo"])
def test_ppo_and_dpo_raise_the_gold_reward_above_sfts(demo_run, method):
    """The baseline learns what the gold reward asks, not only its RM (docs/benchmarks.md:
    +0.25 and +0.23, about seven paired standard errors, with 8 answers per prompt)."""
    mean, stderr = paired_difference(answer_scores(demo_run, method), answer_scores(demo_run, "sft"))
    assert mean > 2 * stderr, (mean, stderr)


def test_dt_follows_its_target_score(demo_run):
    mean, stderr = paired_difference(answer_scores(demo_run, "dt"), answer_scores(demo_run, "dt_low"))
    assert mean > 2 * stderr, (mean, stderr)
