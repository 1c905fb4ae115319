"""`orlhf seeds-report`: the statistics across replicates against hand-built `report.json`
files (the expected numbers computed here with `statistics` and t-table values), the t
quantile against table values and closed forms, skips, refusals, and the stage end to end
through the CLI, including on replicates whose report.json the real `orlhf report` wrote."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from offline_rlhf.cli import main
from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.evaluation import SeedsReportConfig
from offline_rlhf.eval.results import summarize
from offline_rlhf.eval.seeds import read_replicates, replicate_dirs, t_cdf, t_quantile
from offline_rlhf.ledger import read_ledger
from tests.unit.eval import report_fixtures

# Per replicate, each model's gold mean over prompts (rwr was not evaluated in seed_3), chosen
# so that DT against PPO is undecided and RWR against PPO is clearly below.
GOLD = {"seed_1": {"sft": 0.0, "dt": 1.0, "ppo": 1.5, "rwr": 0.5},
        "seed_2": {"sft": 0.2, "dt": 1.4, "ppo": 1.2, "rwr": 0.6},
        "seed_3": {"sft": -0.1, "dt": 0.8, "ppo": 1.1},
        "seed_10": {"sft": 0.1, "dt": 1.1, "ppo": 1.6, "rwr": 0.4}}
RM = {name: {model: 2 * value + 1 for model, value in gold.items()} for name, gold in GOLD.items()}
# Table 3 totals per replicate (device-hours); shares of PPO's follow.
COSTS = {"seed_1": {"dt": 90.0, "rwr": 89.0, "ppo": 730.0}, "seed_2": {"dt": 80.0, "rwr": 85.0, "ppo": 700.0},
         "seed_3": {"dt": 100.0, "rwr": 95.0, "ppo": 760.0}, "seed_10": {"dt": 85.0, "rwr": 90.0, "ppo": 720.0}}
ORDER = ["seed_1", "seed_2", "seed_3", "seed_10"]  # by seed number, not by name
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 10: 2.228, 30: 2.042}  # Student's t table, two-sided 95%


def report_json(gold: dict[str, float], rm: dict[str, float], costs: dict[str, float], **extra) -> dict:
    """A report.json as `orlhf report` writes it, reduced to what seeds-report reads."""
    methods = [{"model": m, "quality": {"gold": {"mean": v}, "rm": {"mean": rm[m]}}, "stale": None,
                "cost_elsewhere": None} for m, v in gold.items()]
    methods += [{"model": m, "quality": {}, "stale": None, "cost_elsewhere": None} for m in costs if m not in gold]
    table3 = [{"method": m, "total": v, "share_of_ppo": v / costs["ppo"] if "ppo" in costs else None}
              for m, v in costs.items()]
    return {"methods": methods, "table3": table3, "evaluation": {"baseline": "sft", "models": {}}, **extra}


def write_replicates(run: Path, names=tuple(ORDER)) -> Path:
    for name in names:
        (run / name).mkdir(parents=True)
        (run / name / "report.json").write_text(json.dumps(report_json(GOLD[name], RM[name], COSTS[name])))
    return run


def expected_difference(values: list[float]) -> dict:
    """Mean, s.e. and the 95% t interval of paired differences, computed independently."""
    k = len(values)
    mean, stderr = statistics.mean(values), statistics.stdev(values) / math.sqrt(k)
    return {"k": k, "mean": mean, "stderr": stderr, "low": mean - T975[k - 1] * stderr,
            "high": mean + T975[k - 1] * stderr}


def seeds_report(run: Path, *overrides: str) -> dict:
    assert main(["seeds-report", f"run_dir={run}", *overrides]) == 0
    return json.loads((run / "seeds_report.json").read_text())


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantiles_match_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=6e-4)
    assert t_quantile(0.025, df) == pytest.approx(-t_quantile(0.975, df), rel=1e-12)


def test_t_quantiles_match_closed_forms_and_invert_the_cdf():
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
        assert t_cdf(t_quantile(p, 7), 7) == pytest.approx(p, abs=1e-12)
        assert t_cdf(-t_quantile(p, 7), 7) == pytest.approx(1 - p, abs=1e-12)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.96, abs=1e-3)  # the normal's, for many degrees of freedom
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_means_errors_and_paired_differences_across_seeds(tmp_path):
    report = seeds_report(write_replicates(tmp_path / "run"))
    assert [r["name"] for r in report["replicates"]] == ORDER and report["skipped"] == []
    for scorer, values in (("gold", GOLD), ("rm", RM)):
        rows = report["scorers"][scorer]
        dt = [values[name]["dt"] for name in ORDER]
        assert rows["dt"]["k"] == 4 and rows["dt"]["mean"] == pytest.approx(statistics.mean(dt))
        assert rows["dt"]["stderr"] == pytest.approx(statistics.stdev(dt) / 2)
        assert (rows["dt"]["min"], rows["dt"]["max"]) == (min(dt), max(dt))
        for model, reference in (("dt", "sft"), ("dt", "ppo"), ("ppo", "sft"), ("rwr", "ppo"), ("rwr", "sft")):
            pairs = [values[n][model] - values[n][reference] for n in ORDER if model in values[n]]
            found = rows[model]["against"][reference]
            for key, value in expected_difference(pairs).items():
                assert found[key] == pytest.approx(value, abs=2e-3 * max(1.0, found["stderr"]))
            assert found["above"] == sum(d > 0 for d in pairs) and found["below"] == sum(d < 0 for d in pairs)
        assert "sft" not in rows["sft"]["against"] and "ppo" not in rows["ppo"]["against"]
    rwr = report["scorers"]["gold"]["rwr"]  # not evaluated in seed_3: three replicates, paired where both are
    assert rwr["k"] == 3 and list(rwr["seeds"]) == ["seed_1", "seed_2", "seed_10"]
    assert rwr["against"]["ppo"]["k"] == 3 and rwr["against"]["ppo"]["above"] == 0
    assert report["scorers"]["gold"]["dt"]["against"]["ppo"]["above"] == 1  # seed_2 only


def test_device_hours_and_shares_across_seeds(tmp_path):
    costs = seeds_report(write_replicates(tmp_path / "run"))["device_hours"]
    shares = [COSTS[n]["dt"] / COSTS[n]["ppo"] for n in ORDER]
    assert costs["dt"]["total"]["mean"] == pytest.approx(statistics.mean(COSTS[n]["dt"] for n in ORDER))
    assert costs["dt"]["share_of_ppo"]["mean"] == pytest.approx(statistics.mean(shares))
    assert (costs["dt"]["share_of_ppo"]["min"], costs["dt"]["share_of_ppo"]["max"]) == (min(shares), max(shares))
    assert costs["ppo"]["share_of_ppo"]["mean"] == 1.0 and costs["rwr"]["total"]["k"] == 4  # costed though unevaluated


def test_verdicts_say_what_the_interval_says_and_never_equivalence(tmp_path):
    run = write_replicates(tmp_path / "run")
    verdicts = {v["model"]: v for v in seeds_report(run)["verdicts"]}
    assert set(verdicts) == {"dt", "rwr"}  # not SFT, not PPO itself
    dt = expected_difference([GOLD[n]["dt"] - GOLD[n]["ppo"] for n in ORDER])
    assert dt["low"] < 0 < dt["high"]
    assert verdicts["dt"]["label"] == ("interval contains 0 (no difference detected at 4 seeds; not a proof of "
                                       "equivalence)")
    share = statistics.mean(COSTS[n]["dt"] / COSTS[n]["ppo"] for n in ORDER)
    assert verdicts["dt"]["text"].startswith(f"dt: gold − ppo {dt['mean']:+.3f} ± {dt['stderr']:.3f} (95% CI ")
    assert f"above PPO in 1 of 4 seeds) at {share:.1%} (" in verdicts["dt"]["text"]
    rwr = expected_difference([GOLD[n]["rwr"] - GOLD[n]["ppo"] for n in ("seed_1", "seed_2", "seed_10")])
    assert rwr["high"] < 0 and verdicts["rwr"]["label"] == "below PPO"
    text = (run / "seeds_report.md").read_text()
    assert f"- {verdicts['dt']['text']}" in text and "equivalent" not in text.replace("equivalence", "")
    row = next(line for line in text.split("## gold", 1)[1].splitlines() if line.startswith("| rwr |"))
    assert row.startswith("| rwr | 3 | 0.500 ± 0.058 | 0.400..0.600 | ")
    interval = f"[{rwr['low']:+.3f}, {rwr['high']:+.3f}]"
    assert row.endswith(f"| {rwr['mean']:+.3f} ± {rwr['stderr']:.3f} {interval} | 0 of 3 |")


def test_the_stage_writes_both_files_done_and_a_ledger_row(tmp_path):
    run = write_replicates(tmp_path / "run")
    report = seeds_report(run)
    assert (run / "seeds-report" / "DONE").read_text().strip() == str(run / "seeds_report.md")
    assert yaml.safe_load((run / "seeds-report" / "config.yaml").read_text())["run_dir"] == str(run)
    assert [row.stage for row in read_ledger(run)] == ["seeds-report"]
    text = (run / "seeds_report.md").read_text()
    assert text.startswith(f"# Methods across training seeds: `{run}`")
    assert "Used: seed_1, seed_2, seed_3, seed_10." in text and "Skipped: none." in text
    assert report["level"] == 0.95 and not list(run.glob("*.tmp"))


def test_replicates_can_be_named_and_must_lie_inside_run_dir(tmp_path):
    run = write_replicates(tmp_path / "run")
    report = seeds_report(run, "replicates=[seed_10,seed_2]")
    assert [r["name"] for r in report["replicates"]] == ["seed_10", "seed_2"]
    assert report["scorers"]["gold"]["dt"]["k"] == 2
    (run / "again").mkdir()
    (run / "seed_1").rename(run / "again" / "seed_2")  # a folder of the same name elsewhere in run_dir
    report = seeds_report(run, "replicates=[./seed_2,again/seed_2]")
    assert list(report["scorers"]["gold"]["dt"]["seeds"]) == ["seed_2", "again/seed_2"]
    assert report["scorers"]["gold"]["dt"]["seeds"]["again/seed_2"] == GOLD["seed_1"]["dt"]
    for bad in ("../elsewhere", str(tmp_path)):
        with pytest.raises(ConfigError, match=r"^replicates\[0\]: .* is not a folder inside run_dir"):
            SeedsReportConfig(run_dir=str(run), replicates=[bad])
    with pytest.raises(ConfigError, match=r"^replicates\[1\]: './seed_1' is listed twice"):
        SeedsReportConfig(run_dir=str(run), replicates=["seed_1", "./seed_1"])
    with pytest.raises(ConfigError, match=r"^replicates: .*seed_7 is not a folder"):
        replicate_dirs(run, ["seed_7"])


def test_unusable_replicates_and_stale_models_are_listed_and_strict_fails(tmp_path):
    run = write_replicates(tmp_path / "run", names=("seed_1", "seed_2", "seed_3"))
    (run / "seed_4").mkdir()  # never reported
    no_eval = report_json(GOLD["seed_10"], RM["seed_10"], COSTS["seed_10"])
    (run / "seed_5").mkdir()
    (run / "seed_5" / "report.json").write_text(json.dumps({**no_eval, "evaluation": None}))
    stale = json.loads((run / "seed_2" / "report.json").read_text())
    stale["methods"][1]["stale"] = "R/align_dt/checkpoints now resolves to step_2, not the evaluated step_1"
    (run / "seed_2" / "report.json").write_text(json.dumps(stale))
    # seed_3's dt checkpoint changed after its report: found now by eval.report.stale_evaluations
    gone = run / "seed_3" / "align_dt" / "checkpoints"
    gone.mkdir(parents=True)
    late = json.loads((run / "seed_3" / "report.json").read_text())
    late["evaluation"]["models"] = {"dt": {"configured": str(gone), "checkpoint": str(gone / "step_1"),
                                           "checkpoint_sha256": "0" * 64}}
    (run / "seed_3" / "report.json").write_text(json.dumps(late))
    report = seeds_report(run)
    skipped = {(s["replicate"], s["model"]): s["why"] for s in report["skipped"]}
    assert list(skipped) == [("seed_2", "dt"), ("seed_3", "dt"), ("seed_4", None), ("seed_5", None)]
    assert skipped[("seed_3", "dt")] == f"{gone} holds no complete checkpoint any more"
    assert skipped[("seed_4", None)].startswith("no report.json (run `orlhf report run_dir=")
    assert "no evaluation results" in skipped[("seed_5", None)]
    dt = report["scorers"]["gold"]["dt"]
    assert dt["k"] == 1 and dt["stderr"] is None and dt["against"]["ppo"]["low"] is None
    assert "dt" not in report["device_hours"] or report["device_hours"]["dt"]["total"]["k"] == 1
    assert {v["model"]: v["label"] for v in report["verdicts"]}["dt"] == "undecided (one seed has both)"
    text = (run / "seeds_report.md").read_text()
    assert "Skipped: 4 (`strict=true` fails on them instead)." in text and "| seed_4 | all | no report.json" in text
    with pytest.raises(ConfigError, match=r"^strict: seed_2 model dt would be skipped: .*\(4 skip\(s\) in all\)"):
        main_raising(run, "strict=true")


def main_raising(run: Path, *overrides: str) -> None:
    """The stage's main on a composed config: its ConfigError itself, not the CLI's exit status."""
    from offline_rlhf.stages.seeds_report import main as stage_main

    stage_main(compose_stage("seeds-report", SeedsReportConfig, [f"run_dir={run}", *overrides]))


def test_one_usable_replicate_is_refused_in_one_line(tmp_path, capsys):
    run = write_replicates(tmp_path / "run", names=("seed_1",))
    (run / "seed_2").mkdir()
    assert main(["seeds-report", f"run_dir={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"orlhf seeds-report: error: replicates: 1 usable replicate(s); skipped: seed_2 (no report.json "
                   f"(run `orlhf report run_dir={run / 'seed_2'}`)): a standard error across seeds needs at least 2; "
                   "run the pipeline with pipeline.seeds=[1, 2, 3] (one run per seed in run_dir/seed_<s>/)")
    assert not (run / "seeds-report").exists() and not (run / "ledger.jsonl").exists()
    nothing = report_json({}, {}, COSTS["seed_1"])  # costed, but no model evaluated
    (run / "seed_2" / "report.json").write_text(json.dumps(nothing))
    used, skipped = read_replicates(replicate_dirs(run, []), strict=False)
    assert [r.name for r in used] == ["seed_1"]
    assert skipped == [{"replicate": "seed_2", "model": None, "why": "no model with a usable evaluation"}]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"holds no seed_<s>/ replicate folders; run the pipeline with pipeline"):
        replicate_dirs(empty, [])


def test_non_finite_and_malformed_reports_are_errors_naming_the_file(tmp_path):
    run = write_replicates(tmp_path / "run")
    broken = json.loads((run / "seed_2" / "report.json").read_text())
    broken["methods"][2]["quality"]["gold"]["mean"] = float("nan")  # json.dumps writes NaN, as report.py would
    (run / "seed_2" / "report.json").write_text(json.dumps(broken))
    dirs = replicate_dirs(run, [])
    with pytest.raises(ConfigError, match=rf"^run_dir: {run / 'seed_2' / 'report.json'}: methods\[2\].quality.gold"
                                          r".mean is nan, not a finite number"):
        read_replicates(dirs, strict=False)
    (run / "seed_2" / "report.json").write_text('{"methods": [],\n "table3": ')
    with pytest.raises(ConfigError, match=rf"^run_dir: {run / 'seed_2' / 'report.json'}:2: not valid JSON"):
        read_replicates(dirs, strict=False)
    (run / "seed_2" / "report.json").write_text(json.dumps({"methods": [{"model": "dt"}], "table3": [],
                                                            "evaluation": {}}))
    with pytest.raises(ConfigError, match=r"report.json: methods\[0\].quality: expected dict"):
        read_replicates(dirs, strict=False)
    (run / "seed_2" / "report.json").write_text(json.dumps({"methods": [], "table3": []}))
    with pytest.raises(ConfigError, match=r"report.json: expected the object `orlhf report` writes"):
        read_replicates(dirs, strict=False)


def test_the_settings_that_differed_are_listed(tmp_path):
    run = write_replicates(tmp_path / "run", names=("seed_1", "seed_2"))
    for seed in (1, 2):
        replicate = run / f"seed_{seed}"
        config = {"run_dir": str(replicate), "seed": 1000 + seed, "optim": {"lr": 1e-5},
                  "init": {"checkpoint": f"{replicate}/sft/checkpoints"}, "note": f"{replicate}x",
                  "data": {"sources": [{"path": f"{replicate}/mix/aligned.jsonl", "weight": 1.0}]}}
        (replicate / "align_dt").mkdir()
        (replicate / "align_dt" / "config.yaml").write_text(yaml.safe_dump(config))
    report = seeds_report(run)
    # paths inside each replicate's own run_dir (in lists too) are the same setting; another path is not
    assert report["settings_that_differed"] == [  # in the file's key order (safe_dump sorts them)
        {"stage": "align_dt", "key": "note", "values": {"seed_1": f"{run}/seed_1x", "seed_2": f"{run}/seed_2x"}},
        {"stage": "align_dt", "key": "seed", "values": {"seed_1": 1001, "seed_2": 1002}}]
    assert "| align_dt | seed | 1001 | 1002 |" in (run / "seeds_report.md").read_text()


def test_on_replicates_the_real_report_stage_wrote(tmp_path):
    """Each replicate: the report fixtures' run (ledger with Table 3's hours), its eval results
    rewritten with this seed's scores, then the real `orlhf report`."""
    run = tmp_path / "run"
    scores = {1: {"sft": [0.0, 1.0], "dt": [1.0, 2.0], "ppo": [2.0, 2.5], "dt_low": [0.0, 0.5]},
              2: {"sft": [0.5, 0.5], "dt": [1.0, 1.5], "ppo": [2.5, 2.5], "dt_low": [0.5, 0.5]},
              3: {"sft": [0.0, 0.0], "dt": [1.5, 1.5], "ppo": [2.0, 3.0], "dt_low": [0.0, 0.0]}}
    for seed, by_model in scores.items():
        replicate = report_fixtures.write_run(run / f"seed_{seed}")
        results = json.loads((replicate / "eval" / "results.json").read_text())
        results["table"] = summarize({m: {"gold": v} for m, v in by_model.items()}, "sft", samples=10)
        (replicate / "eval" / "results.json").write_text(json.dumps(results))
        assert main(["report", f"run_dir={replicate}"]) == 0
    report = seeds_report(run)
    dt = report["scorers"]["gold"]["dt"]
    assert dt["seeds"] == {"seed_1": 1.5, "seed_2": 1.25, "seed_3": 1.5}
    expected = expected_difference([1.5 - 2.25, 1.25 - 2.5, 1.5 - 2.5])
    assert dt["against"]["ppo"]["mean"] == pytest.approx(expected["mean"])
    assert dt["against"]["ppo"]["high"] == pytest.approx(expected["high"], abs=1e-3) and expected["high"] < 0
    verdict = next(v for v in report["verdicts"] if v["model"] == "dt")
    assert verdict["label"] == "below PPO" and "at 12.3% (12.3%-12.3%) of PPO's device-hours" in verdict["text"]
    assert [v["model"] for v in report["verdicts"]] == ["dt", "dt_low"]  # dt_low: no cost of its own
    assert next(v["text"] for v in report["verdicts"] if v["model"] == "dt_low").endswith(
        "seeds); no device-hours of its own (not a method of Table 3 beside PPO): below PPO")
    assert report["device_hours"]["ppo"]["total"]["mean"] == 730.0 and report["skipped"] == []
