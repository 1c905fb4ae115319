"""`orlhf launch --config-dir DIR`: the user's pipeline, cluster and model configs, kept out of
the install's conf/, are found by the launcher and by every stage it plans and runs (the flag
goes on each stage's command line: jobs start elsewhere)."""

from __future__ import annotations

import shlex

import pytest

from offline_rlhf.cli import main
from tests.unit.config.test_config_dirs import MODEL, user_configs

PIPELINE = "name: mine\nstages:\n  - stage: smoke\n    overrides: [model=mine, steps=2]\n"
CLUSTER = "kind: slurm\npartition: gpu\naccount: lab\ngpus_per_node: 2\nexclusive: true\ntime_limit: '01:00:00'\n"


@pytest.fixture
def conf(tmp_path):
    return user_configs(tmp_path / "my conf", {"model/mine.yaml": MODEL, "pipeline/mine.yaml": PIPELINE,
                                               "cluster/lab.yaml": CLUSTER})


def test_the_users_pipeline_cluster_and_model_reach_the_rendered_job(tmp_path, conf, capsys):
    run_dir = tmp_path / "run"
    assert main(["launch", "--config-dir", str(conf), "pipeline=mine", "cluster=lab", f"run_dir={run_dir}",
                 "--dry-run"]) == 0
    rendered = run_dir / "dry_run" / "smoke"
    script = (rendered / "submission.sh").read_text()
    assert "#SBATCH --partition=gpu\n#SBATCH --account=lab\n" in script
    # The path has a space: quoted as one word of the stage's command line.
    assert f"-m offline_rlhf.cli smoke {shlex.quote(f'--config-dir={conf}')} model=mine steps=2 " in script
    config = (rendered / "config.yaml").read_text()
    assert "model:\n  name: mine\n  vocab_size: 512\n  dim: 96\n  n_layers: 3\n" in config
    assert "pipeline mine: 1 stage(s) validated" in capsys.readouterr().out


def test_a_local_run_passes_the_folder_to_each_stage(tmp_path, conf, capsys):
    assert main(["pipeline", f"--config-dir={conf}", "pipeline=mine", f"run_dir={tmp_path / 'run'}",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"offline_rlhf.cli smoke {shlex.quote(f'--config-dir={conf}')} model=mine steps=2 run_dir=" in out


def test_without_the_folder_the_pipeline_is_unknown_and_with_it_it_is_listed(tmp_path, conf, capsys):
    assert main(["launch", "pipeline=mine", f"run_dir={tmp_path}"]) == 2
    assert "pipeline: no config named 'mine'; choose one of: demo, offline_all," in capsys.readouterr().err
    assert main(["launch", f"--config-dir={conf}", "pipeline=other", f"run_dir={tmp_path}"]) == 2
    assert "choose one of: demo, mine, offline_all, offline_dt, offline_vs_ppo, smoke" in capsys.readouterr().err


def test_in_a_container_the_folder_must_be_mounted_where_it_is(tmp_path, conf, capsys):
    """The stage composes its config in the job, so it must see the folder at the same path."""
    args = ["launch", f"--config-dir={conf}", "pipeline=mine", "cluster=lab", f"run_dir={tmp_path / 'run'}",
            "cluster.container_image=/images/orlhf.sqsh", "--dry-run"]
    assert main(args) == 2
    assert (f"orlhf launch: error: --config-dir: {conf} is neither under run_dir ({tmp_path / 'run'}) nor under a "
            "cluster.container_mounts item mounted at the same path") in capsys.readouterr().err
    assert main([*args[:-1], f"cluster.container_mounts=['{conf}:{conf}']", "--dry-run"]) == 0


def test_status_takes_the_folder_too_and_a_misspelt_option_is_named(tmp_path, conf, capsys):
    """A shell alias that always adds --config-dir must not break `orlhf launch status`."""
    assert main(["launch", "status", f"--config-dir={conf}", f"run_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith(f"orlhf launch: error: run_dir: no launch.json in {tmp_path}")
    assert main(["launch", "--dryrun", "pipeline=smoke"]) == 2
    assert capsys.readouterr().err == ("orlhf launch: error: --dryrun: unknown option; the options are --dry-run, "
                                       "--config-dir DIR and --help\n")


def test_broken_files_of_the_users_are_one_line_naming_them(tmp_path, capsys):
    conf = user_configs(tmp_path / "conf", {
        "model/broken.yaml": "name: broken\ndim: [1, 2\n",
        "pipeline/uses_broken.yaml": "name: uses_broken\nstages: [{stage: smoke, overrides: [model=broken]}]\n",
        "pipeline/torn.yaml": "name: torn\nstages: [{stage: smoke\n",
        "pipeline/nameless.yaml": "stages: [{stage: smoke}]\n"})
    expected = {
        "uses_broken": f"pipeline.stages[0] (smoke): orlhf smoke: error: {conf}/model/broken.yaml:3: is not valid "
                       "YAML (while parsing a flow sequence, expected ',' or ']', but got '<stream end>'); fix that "
                       "file",
        "torn": f"{conf}/pipeline/torn.yaml:3: is not valid YAML (expected ',' or '}}', but got '<stream end>'); "
                "fix that file",
        "nameless": "pipeline.name: is not set; add `name: <name>` to the pipeline's file (the run's default folder "
                    "is runs/<name>)"}
    for pipeline, line in expected.items():
        assert main(["launch", f"--config-dir={conf}", f"pipeline={pipeline}", f"run_dir={tmp_path / 'run'}",
                     "--dry-run"]) == 2
        assert capsys.readouterr().err == f"orlhf launch: error: {line}\n", pipeline
