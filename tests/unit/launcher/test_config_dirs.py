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
