"""`pipeline.seeds`: the whole pipeline once per training seed in run_dir/seed_<s>/, the seed
set through `pipeline.seed_keys` after the entries' own overrides, `orlhf seeds-report` last
in run_dir; on Slurm each replicate a chain of its own and the report after all of them.
Slurm's commands are fake scripts on PATH (tests/unit/launcher/test_launch_review.py)."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from launcher import cli, slurm, status
from launcher.compose import compose_launch
from launcher.local import DONE
from launcher.plan import plan_pipeline, waits_for
from launcher.schema import DEFAULT_SEED_KEYS, LaunchError, StageEntry
from launcher.seeds import sweep_steps
from offline_rlhf.cli import STAGES
from tests.unit.launcher.test_launch_review import FakeSlurm
from tests.unit.launcher.test_rounds import pipeline as rounds_pipeline

DEMO = ["task", "sft", "rm", "generate", "label", "mix", "align_mle_filter", "align_rwr", "align_dt", "reference",
        "align_dpo", "ppo", "eval", "report"]
TRAINED = {"sft", "rm", "align_mle_filter", "align_rwr", "align_dt", "align_dpo"}
# Three entries per replicate, so that a replicate's chain shows; smoke's seed draws its data and weights.
SMALL = ["pipeline=smoke", "cluster=local_slurm", "+pipeline.seed_keys.smoke=[seed]",
         "pipeline.stages=[{stage: task}, {stage: smoke, nproc: 2, overrides: ['parallel.tp=2']}, {stage: report}]"]
AFTER = "--dependency=afterok:"


@pytest.fixture(scope="module")
def demo_plans(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("seeds") / "run"
    return run_dir, plan_pipeline(compose_launch(["pipeline=demo", f"run_dir={run_dir}", "pipeline.seeds=[0,1]"]))


def resolved(plans, name: str) -> dict:
    return yaml.safe_load(next(plan for plan in plans if plan.name == name).config_yaml)


def test_each_replicate_runs_every_stage_in_its_own_folder_and_the_report_comes_last(demo_plans):
    run_dir, plans = demo_plans
    assert [p.name for p in plans] == [f"seed_{s}.{f}" for s in (0, 1) for f in DEMO] + ["seeds-report"]
    assert [p.stage_dir for p in plans[:-1]] == [run_dir / f"seed_{s}" / f for s in (0, 1) for f in DEMO]
    report = plans[-1]
    assert (report.stage, report.stage_dir, report.chain) == ("seeds-report", run_dir / "seeds-report", "")
    assert report.args == ("replicates=[seed_0,seed_1]", f"run_dir={run_dir}")
    waits = waits_for(plans)
    assert waits[0] == [] and waits[14] == [] and waits[15] == [14]  # seed_1 starts a chain of its own
    assert waits[-1] == [13, 27]  # the report waits for each replicate's last stage
    # Within a replicate each stage waits for the stages it reads (the stages list their inputs).
    assert {plans[p].name: [plans[w].name.removeprefix("seed_0.") for w in waits[p]] for p in range(1, 14)} == {
        "seed_0.sft": ["task"], "seed_0.rm": ["sft"], "seed_0.generate": ["sft"], "seed_0.label": ["rm", "generate"],
        "seed_0.mix": ["label"], "seed_0.align_mle_filter": ["mix"], "seed_0.align_rwr": ["mix"],
        "seed_0.align_dt": ["mix"], "seed_0.reference": ["label"], "seed_0.align_dpo": ["reference"],
        "seed_0.ppo": ["rm"], "seed_0.eval": ["align_mle_filter", "align_rwr", "align_dt", "align_dpo", "ppo"],
        "seed_0.report": ["eval"]}


def test_the_seed_reaches_training_and_sampling_only_and_wins_over_the_entrys_own(demo_plans):
    _, plans = demo_plans
    for seed in (0, 1):
        config = {folder: resolved(plans, f"seed_{seed}.{folder}") for folder in DEMO}
        assert {folder for folder in TRAINED if config[folder]["train"]["seed"] == seed} == TRAINED
        assert config["generate"]["generation"]["seed"] == seed
        assert (config["ppo"]["seed"], config["ppo"]["generation"]["seed"]) == (seed, seed)  # demo.yaml: 1234, 0
        # Fixed: the task data, the label and mix draws, the evaluation's prompts and sampling.
        assert (config["task"]["seed"], config["label"]["seed"], config["mix"]["seed"]) == (0, 1234, 1234)
        assert config["eval"]["generation"]["seed"] == 0
    ppo = next(p for p in plans if p.name == "seed_1.ppo")
    assert ppo.args[-3:-1] == ("seed=1", "generation.seed=1") and "seed=1234" not in ppo.args
    label = next(p for p in plans if p.name == "seed_1.label")
    assert not any("seed" in arg.split("=", 1)[0] for arg in label.args)


def test_run_dir_in_the_overrides_is_the_replicates_folder(demo_plans):
    run_dir, plans = demo_plans
    replicate = run_dir / "seed_1"
    assert resolved(plans, "seed_1.sft")["init"]["tokenizer"] == f"{replicate}/task/tokenizer"
    assert resolved(plans, "seed_1.generate")["sources"][0]["path"] == f"{replicate}/task/gen_prompts.jsonl"
    evaluated = {m["name"]: m["checkpoint"] for m in resolved(plans, "seed_1.eval")["models"]}
    assert evaluated["sft"] == f"{replicate}/sft/checkpoints" and evaluated["ppo"] == f"{replicate}/ppo/checkpoints"
    assert resolved(plans, "seed_1.align_dt")["run_dir"] == str(replicate)


def test_rounds_run_inside_each_replicate():
    pipeline = rounds_pipeline(rounds=2)
    pipeline = dataclasses.replace(pipeline, seeds=[3, 5], stages=[*pipeline.stages, StageEntry(stage="report")])
    steps = sweep_steps(pipeline, Path("/runs/it"))
    names = [s.name for s in steps]
    assert names[:9] == ["seed_3.sft", "seed_3.generate", "seed_3.label", "seed_3.mix", "seed_3.align_dt",
                         "seed_3.round_2.generate", "seed_3.round_2.label", "seed_3.round_2.mix",
                         "seed_3.round_2.align_dt"]
    assert names[-1] == "seeds-report" and len(names) == 2 * (8 + 4) + 1  # 8 entries, 4 of them again in round 2
    later = {s.name: s for s in steps}["seed_5.round_2.align_dt"]
    assert (later.run_dir, later.chain) == (Path("/runs/it/seed_5/round_2"), "seed_5")
    assert later.entry.overrides == ["method=dt", "train.seed=5",
                                     "init.checkpoint=/runs/it/seed_5/align_dt/checkpoints"]
    label = {s.name: s for s in steps}["seed_5.round_2.label"]
    assert label.entry.overrides[-1] == "rm=/runs/it/seed_5/rm/checkpoints"  # the replicate's own reward model


def test_every_default_seed_key_is_a_key_of_its_stages_config():
    """Read from the config dataclasses (the launcher itself imports none of them)."""
    for stage, keys in DEFAULT_SEED_KEYS.items():
        module, _, name = STAGES[stage].schema.partition(":")
        schema = getattr(__import__(module, fromlist=[name]), name)
        for key in keys:
            node = schema
            for part in key.split("."):
                fields = {f.name: f for f in dataclasses.fields(node)}
                assert part in fields, f"{stage}: {key}"
                node = typing.get_type_hints(node)[part]
            assert node is int, f"{stage}: {key}"


@pytest.mark.parametrize("override, start", [
    ("pipeline.seeds=[0,1,0]", "pipeline.seeds[2]: repeats seed 0; list each seed once"),
    ("pipeline.seeds=[2,-1]", "pipeline.seeds[1]: must be >= 0, got -1"),
    ("pipeline.seeds=[4]", "pipeline.seeds: one seed (4) has no spread across seeds to report"),
    ("pipeline.seeds=[a,b]", "pipeline.seeds"),
    ("+pipeline.seed_keys.sfft=[train.seed]", "pipeline.seed_keys.sfft: is not a stage; use one of align, convert,"),
    ("pipeline.seed_keys.sft=['train.seed=3']", "pipeline.seed_keys.sft[0]: 'train.seed=3' is not a config key"),
])
def test_invalid_seeds_and_seed_keys_name_the_key(override, start):
    with pytest.raises(LaunchError) as caught:
        compose_launch(["pipeline=smoke", override])
    assert str(caught.value).startswith(start)


def test_seeds_need_a_report_entry_for_seeds_report_to_read(tmp_path):
    cfg = compose_launch(["pipeline=smoke", f"run_dir={tmp_path}", "pipeline.seeds=[0,1]"])
    with pytest.raises(LaunchError, match=r"^pipeline.seeds: seeds-report reads each replicate's report.json, which "
                       r"no entry writes; end the pipeline with `\{stage: report\}`"):
        plan_pipeline(cfg)
    assert not any(tmp_path.iterdir())


def test_a_seed_key_the_stage_lacks_is_refused_by_the_stage_before_anything_runs(tmp_path):
    cfg = compose_launch(["pipeline=smoke", f"run_dir={tmp_path}", "pipeline.seeds=[0,1]",
                          "+pipeline.seed_keys.smoke=[train.seed]"])
    with pytest.raises(LaunchError, match=r"^pipeline.stages\[0\] \(smoke\): orlhf smoke: error: train: unknown key "
                       r"\(not a field of SmokeConfig\)"):
        plan_pipeline(cfg)
    assert not any(tmp_path.iterdir())


def submissions(fake: FakeSlurm, run_dir: Path) -> list[tuple[str, str]]:
    """(the stage's folder in the run, its dependency flag or '') of each sbatch call."""
    calls = [line.split() for line in fake.calls("sbatch")]
    return [(str(Path(c[-1]).parent.relative_to(run_dir)), next((w for w in c if w.startswith("--dependency=")), ""))
            for c in calls]


def completed(plans) -> None:
    """As if each stage had run: its DONE and the config it ran with."""
    for plan in plans:
        plan.stage_dir.mkdir(parents=True, exist_ok=True)
        plan.config_file.write_text(plan.config_yaml)
        (plan.stage_dir / DONE).touch()


def test_on_slurm_replicates_are_chains_side_by_side_and_the_report_waits_for_all(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    fake = FakeSlurm(tmp_path, monkeypatch)
    assert cli.main([*SMALL, f"run_dir={run_dir}", "pipeline.seeds=[0,1]"]) == 0
    assert submissions(fake, run_dir) == [
        ("seed_0/task", ""), ("seed_0/smoke", AFTER + "100"), ("seed_0/report", AFTER + "101"),
        ("seed_1/task", ""), ("seed_1/smoke", AFTER + "103"), ("seed_1/report", AFTER + "104"),
        ("seeds-report", AFTER + "102:105")]
    table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}  # STAGE JOB AFTER SCRIPT
    assert table["seed_1.task"].split()[:3] == ["seed_1.task", "103", "-"]
    assert table["seeds-report"].split()[:4] == ["seeds-report", "106", "seed_0.report,", "seed_1.report"]
    script = (run_dir / "seed_1" / "smoke" / "submission.sh").read_text()
    assert "#SBATCH --job-name=run.seed_1.smoke\n" in script
    assert f"#SBATCH --output={run_dir}/seed_1/smoke/slurm-%j.out\n" in script
    assert f"parallel.tp=2 seed=1 run_dir={run_dir}/seed_1" in script
    record = json.loads((run_dir / "launch.json").read_text())
    names = [f"seed_{seed}.{folder}" for seed in (0, 1) for folder in ("task", "smoke", "report")]
    assert [s["name"] for s in record["stages"]] == [*names, "seeds-report"]
    # Both replicates complete; a third seed runs only its own chain and the report again.
    completed(plan_pipeline(compose_launch([*SMALL, f"run_dir={run_dir}", "pipeline.seeds=[0,1]"]))[:-1])
    assert cli.main([*SMALL, f"run_dir={run_dir}", "pipeline.seeds=[0,1,2]"]) == 0
    assert submissions(fake, run_dir)[7:] == [
        ("seed_2/task", ""), ("seed_2/smoke", AFTER + "107"), ("seed_2/report", AFTER + "108"),
        ("seeds-report", AFTER + "109")]
    out = capsys.readouterr().out
    assert out.count("already complete, skipped") == 6 and "seed_1.report: already complete, skipped" in out


def test_status_counts_the_ledgers_of_replicates_and_their_rounds(tmp_path, monkeypatch, capsys):
    ledgers = {"seed_0": ("sft", "7", 1.25), "seed_0/round_2": ("align_dt", "8", 0.5), ".": ("seeds-report", "9", 0.25)}
    for folder, (stage, job, hours) in ledgers.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        row = {"stage": stage, "job_id": job, "device_hours": hours}
        (tmp_path / folder / "ledger.jsonl").write_text(json.dumps(row) + "\n")
    slurm.write_launch_record(tmp_path, "p", [slurm.SubmittedStage(name, "s", [job]) for name, job in
                                              (("seed_0.sft", "7"), ("seed_0.round_2.align_dt", "8"),
                                               ("seeds-report", "9"))])
    monkeypatch.setattr(status, "query_job", lambda job: slurm.JobInfo("COMPLETED", 10, 0))
    assert status.show_status(tmp_path) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "seed_0.sft               7    COMPLETED  1.2500 (ledger)",
        "seed_0.round_2.align_dt  8    COMPLETED  0.5000 (ledger)",
        "seeds-report             9    COMPLETED  0.2500 (ledger)",
    ]
