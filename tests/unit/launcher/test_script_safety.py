"""Hostile config values: refused with one line naming the key, or quoted so that the job
script and the stage's Hydra parser read them back unchanged."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from launcher.cli import main
from launcher.compose import compose_launch
from launcher.plan import StagePlan, plan_pipeline, run_dir_override
from launcher.render import COMPLETE_MARKER, render_script
from launcher.schema import ClusterConfig, LaunchError

# Every shell metacharacter the issue lists, each one trying to create a file in the cwd.
HOSTILE = "x$(touch PWNED1)`touch PWNED2`;touch PWNED3 'single' \"double\" \\ é"


def refusal(make) -> str:
    with pytest.raises(LaunchError) as caught:
        make()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("changes, key", [
    (dict(partition="batch\ntouch PWNED"), "cluster.partition"),
    (dict(account="llm$(touch PWNED)"), "cluster.account"),
    (dict(mem="0 #"), "cluster.mem"),
    (dict(time_limit="04:00:00;touch PWNED"), "cluster.time_limit"),
    (dict(partition="bätch"), "cluster.partition"),
    (dict(partition=""), "cluster.partition"),
    (dict(container_image="img\rtouch PWNED"), "cluster.container_image"),
    (dict(python="python\u2028touch PWNED"), "cluster.python"),
    (dict(container_mounts=["/data:/data", "/a:/a,/etc:/etc"]), "cluster.container_mounts[1]"),
    (dict(env={"NCCL_DEBUG": "WARN\ntouch PWNED"}), "cluster.env.NCCL_DEBUG"),
    (dict(env={"X;touch PWNED": "1"}), "cluster.env.X;touch PWNED"),
])
def test_cluster_values_that_would_break_a_script_line_are_refused(changes, key):
    assert refusal(lambda: ClusterConfig(kind="slurm", **changes)).startswith(f"{key}: ")


@pytest.mark.parametrize("override, key", [
    ("pipeline.stages.0.name=../escape", "pipeline.stages[0].name"),
    ("pipeline.stages.0.name=a/b", "pipeline.stages[0].name"),
    ("pipeline.stages.0.name='x$(touch PWNED)'", "pipeline.stages[0].name"),
    ("pipeline.stages.0.stage='sft;touch PWNED'", "pipeline.stages[0].stage"),
    ("pipeline.stages.0.time_limit='1:00:00 --wrap=x'", "pipeline.stages[0].time_limit"),
    ("pipeline.stages.0.overrides=['a=1\ntouch PWNED']", "pipeline.stages[0].overrides[0]"),
    ("run_dir='/tmp/run\ntouch PWNED'", "run_dir"),
])
def test_pipeline_values_are_checked_at_composition_naming_their_place(override, key):
    assert refusal(lambda: compose_launch(["pipeline=offline_dt", override])).startswith(f"{key}: ")


def test_a_comma_outside_quotes_is_explained_with_the_key():
    assert refusal(lambda: compose_launch(["pipeline=offline_dt", "run_dir=/tmp/a,b"])).startswith(
        "run_dir: a ',' outside quotes makes a list of values; quote the value")


@pytest.mark.parametrize("run_dir, cluster, problem", [
    ("/tmp/my run", [], "cannot go on an #SBATCH line"),
    ("/tmp/run%j", [], "cannot go on an #SBATCH line"),
    ("/tmp/a,b", ["cluster.container_image=/images/orlhf.sqsh"], "contains ',' or ':'"),
    ("/tmp/a:b", ["cluster.container_image=/images/orlhf.sqsh"], "contains ',' or ':'"),
])
def test_slurm_run_dir_must_fit_on_sbatch_lines_and_in_the_mount_list(tmp_path, run_dir, cluster, problem):
    """Refused before any stage is asked to validate itself: nothing is written."""
    cfg = compose_launch(["pipeline=offline_dt", "cluster=slurm", f"run_dir='{tmp_path}{run_dir}'", *cluster])
    message = refusal(lambda: plan_pipeline(cfg))
    assert message.startswith(f"run_dir: '{tmp_path}{run_dir}' ") and problem in message
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("path", [
    "/tmp/runs/a,b c", "/tmp/it's \"quoted\"", "/tmp/é/日本", "/tmp/back\\slash\\", f"/tmp/{HOSTILE}",
    "/tmp/[list]", "/tmp/{dict: 1}", "/tmp/key=value", "/tmp/a=b,c=d",
])
def test_run_dir_round_trips_through_hydra_overrides(path):
    override = run_dir_override(Path(path))
    assert OverridesParser.create().parse_overrides([override])[0].value() == path
    assert compose_launch(["pipeline=offline_dt", override]).run_dir == path


@pytest.mark.parametrize("path", ["/lustre/runs/dt8b", "/", "/a/-5", "/a/1e5", "/a/null", "/a/true", "/a+b/.5"])
def test_plain_run_dirs_stay_unquoted_and_still_parse_as_strings(path):
    override = run_dir_override(Path(path))
    assert override == f"run_dir={path}"
    assert OverridesParser.create().parse_overrides([override])[0].value() == path


def test_run_dir_references_in_stage_overrides_are_left_for_the_stage():
    """Pasted in by the launcher, a run_dir with a comma turned this override into a sweep."""
    cfg = compose_launch(["pipeline=offline_dt", "run_dir='/tmp/a,b'",
                          "pipeline.stages.0.overrides=['init.tokenizer=${run_dir}/tok']"])
    assert cfg.pipeline.stages[0].overrides == ["init.tokenizer=${run_dir}/tok"]


def test_status_reads_run_dir_with_the_quoting_launch_prints(tmp_path, capsys):
    run_dir = tmp_path / "a,b c"
    assert main(["status", run_dir_override(run_dir)]) == 2
    assert capsys.readouterr().err == (f"orlhf launch: error: run_dir: no launch.json in {run_dir}: status lists "
                                       "the jobs of a Slurm launch; a local run's stages log to <stage>/launch.log, "
                                       "its device-hours are in ledger.jsonl (`orlhf report` sums them)\n")


def test_run_dir_with_an_interpolation_is_refused():
    assert refusal(lambda: run_dir_override(Path("/tmp/${oops}"))).startswith("run_dir: '/tmp/${oops}' contains '${'")


# --- the rendered script, executed --------------------------------------------------------

def hostile_plan(run_dir: Path) -> StagePlan:
    """Built directly, past the config checks, so only the script's quoting stands in the way."""
    return StagePlan(name=HOSTILE, stage=HOSTILE, args=(f"data.path={HOSTILE}", run_dir_override(run_dir)),
                     nodes=1, procs_per_node=1, stage_dir=run_dir / HOSTILE, config_yaml="", time_limit="04:00:00")


def hostile_cluster() -> ClusterConfig:
    return ClusterConfig(kind="slurm", time_limit="04:00:00", max_attempts=2, env={"ORLHF_HOSTILE": HOSTILE},
                         container_image=HOSTILE, container_mounts=[f"/data/{HOSTILE}:/data"])


def run_script(script: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """bash runs the script in an empty folder with an `srun` that records its arguments and
    the exported variable; anything an injected command creates lands in that folder."""
    tools, workdir, record = tmp_path / "tools", tmp_path / "cwd", tmp_path / "srun.args"
    tools.mkdir()
    workdir.mkdir()
    srun = tools / "srun"
    srun.write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" "$ORLHF_HOSTILE" > {record}\n')
    srun.chmod(0o755)
    path = tmp_path / "submission.sh"
    path.write_text(script)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(path)], cwd=workdir, env=env, capture_output=True, text=True)
    assert not list(workdir.iterdir()), "an injected command ran"
    return proc, record


def test_hostile_values_render_a_script_bash_accepts(tmp_path):
    script = render_script(hostile_plan(tmp_path / "run"), hostile_cluster(), python=HOSTILE)
    path = tmp_path / "submission.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_hostile_values_reach_srun_verbatim_and_run_nothing(tmp_path):
    plan = hostile_plan(tmp_path / "run")
    plan.stage_dir.mkdir(parents=True)  # as write_stage_files leaves it
    proc, record = run_script(render_script(plan, hostile_cluster(), python=HOSTILE), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().split("\0")[:-1] == [
        "--kill-on-bad-exit=1", f"--container-image={HOSTILE}",
        f"--container-mounts={tmp_path / 'run'}:{tmp_path / 'run'},/data/{HOSTILE}:/data", "--no-container-mount-home",
        "bash", "-c", 'trap "" USR1; exec "$@"', "ignore-usr1",
        HOSTILE, "-m", "offline_rlhf.cli", HOSTILE, f"data.path={HOSTILE}", run_dir_override(tmp_path / "run"),
        HOSTILE]
    assert (plan.stage_dir / COMPLETE_MARKER).exists()


def test_completion_guard_echoes_a_hostile_stage_name_without_running_it(tmp_path):
    plan = hostile_plan(tmp_path / "run")
    plan.stage_dir.mkdir(parents=True)
    (plan.stage_dir / COMPLETE_MARKER).touch()
    proc, record = run_script(render_script(plan, hostile_cluster(), python=HOSTILE), tmp_path)
    assert (proc.returncode, proc.stdout) == (0, f"{HOSTILE}: already complete\n")
    assert not record.exists()
