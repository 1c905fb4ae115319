"""Launch config composition and its one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launcher.cli import main
from launcher.compose import compose_launch
from launcher.schema import LaunchError, time_limit_seconds


def launch_error(*overrides: str) -> str:
    with pytest.raises(LaunchError) as caught:
        compose_launch(list(overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_pipeline_and_cluster_files_fill_the_schema():
    cfg = compose_launch(["pipeline=smoke", "cluster=slurm", "cluster.partition=batch", "run_dir=/tmp/r"])
    assert cfg.cluster.kind == "slurm" and cfg.cluster.partition == "batch" and cfg.cluster.gpus_per_node == 8
    assert [(s.stage, s.nproc, s.overrides) for s in cfg.pipeline.stages] == [("smoke", 2, ["parallel.tp=2"])]
    assert cfg.run_dir == "/tmp/r"


def test_local_slurm_extends_slurm_without_gpus():
    cluster = compose_launch(["pipeline=smoke", "cluster=local_slurm"]).cluster
    assert (cluster.kind, cluster.gpus_per_node, cluster.time_limit, cluster.exclusive) == ("slurm", None, None, False)


def test_unknown_cluster_key_names_the_key():
    assert launch_error("pipeline=smoke", "cluster=slurm", "cluster.partiton=batch").startswith(
        "cluster.partiton: unknown key")


def test_unknown_key_in_a_pipeline_entry_names_the_entry():
    assert launch_error("pipeline=smoke", "pipeline.stages.0.nodez=2").startswith(
        "pipeline.stages[0].nodez: unknown key")


def test_adding_keys_with_plus_is_refused_except_environment_variables():
    assert launch_error("pipeline=smoke", "+cluster.gpus=8").startswith("cluster.gpus: keys cannot be added")
    assert compose_launch(["pipeline=smoke", "+cluster.env.NCCL_IB_HCA=mlx5"]).cluster.env == {"NCCL_IB_HCA": "mlx5"}


def test_missing_or_unknown_pipeline_lists_the_choices():
    assert launch_error() .startswith("pipeline: required; choose one of: ")
    message = launch_error("pipeline=offline_dpo")
    assert message.startswith("pipeline: no config named 'offline_dpo'") and "offline_dt" in message


@pytest.mark.parametrize("override, start", [
    ("cluster.launch_mode=mpi", "cluster.launch_mode: unknown mode 'mpi'"),
    ("cluster.max_attempts=3", "cluster.max_attempts: automatic continuation needs a time limit"),
    ("cluster.gpus_per_node=0", "cluster.gpus_per_node: must be >= 1"),
    ("+cluster.env.SLURM_NNODES=2", "cluster.env.SLURM_NNODES: is set by Slurm"),
    # Derived per job (the job script unsets a leaked one): a fixed one would send every job
    # to one rendezvous.
    ("+cluster.env.MASTER_ADDR=n1", "cluster.env.MASTER_ADDR: is set by Slurm or torchrun for each process, or "
                                    "derived per job; remove it from cluster.env"),
    ("+cluster.env.MASTER_PORT=29500", "cluster.env.MASTER_PORT: is set by Slurm or torchrun"),
    ("+cluster.env.TORCHELASTIC_RUN_ID=x", "cluster.env.TORCHELASTIC_RUN_ID: is set by Slurm or torchrun"),
    ("cluster.gpus_per_node=eight", "cluster.gpus_per_node: Value 'eight'"),
    ("cluster.signal_lead_s=-1", "cluster.signal_lead_s: must be in [0, 65535] seconds, got -1"),
    ("cluster.signal_lead_s=70000", "cluster.signal_lead_s: must be in [0, 65535] seconds, got 70000"),
    ("cluster.time_limit=2", "cluster.time_limit: 2 is not longer than cluster.signal_lead_s=120 s, the time before "
                             "the limit at which training stages save and stop; give the stage more time or lower"),
    ("pipeline.stages.0.time_limit=01:30", "pipeline.stages[0].time_limit: 01:30 is not longer than "
                                           "cluster.signal_lead_s=120 s"),
])
def test_invalid_values_name_the_key(override, start):
    assert launch_error("pipeline=smoke", override).startswith(start)


def test_the_signal_lead_fits_any_slurm_time_and_zero_turns_it_off():
    assert [time_limit_seconds(value) for value in ("90", "30:00", "04:00:00", "2-12", "2-12:30", "2-12:30:05",
                                                    "UNLIMITED")] == [5400, 1800, 14400, 216000, 217800, 217805, None]
    assert compose_launch(["pipeline=smoke", "cluster=slurm"]).cluster.signal_lead_s == 120
    cluster = compose_launch(["pipeline=smoke", "cluster.time_limit=2", "cluster.signal_lead_s=0"]).cluster
    assert (cluster.time_limit, cluster.signal_lead_s) == ("2", 0)
    assert compose_launch(["pipeline=smoke", "cluster.time_limit=3"]).cluster.time_limit == "3"  # 180 s > 120 s


def test_cli_prints_one_error_line_and_exits_2(capsys):
    assert main(["pipeline=smoke", "cluster.partiton=batch"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "orlhf launch: error: cluster.partiton: unknown key; check the spelling; " \
                           "see launcher/schema.py for the keys\n"


def test_status_takes_only_run_dir(capsys):
    assert main(["status", "run_dir=/nowhere", "verbose=1"]) == 2
    assert capsys.readouterr().err.startswith("orlhf launch: error: verbose: status takes exactly one run_dir=DIR")


def test_launcher_imports_neither_torch_nor_the_training_packages():
    code = ("import sys, launcher.cli; "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'offline_rlhf', 'ppo_baseline')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
