"""The launcher review (helper-36's findings): stage folders are the stages' own, a dry run
leaves the run alone, submission failures and Ctrl-C cancel what was queued, Slurm values
and override quoting are checked with fitting hints, and a relaunch respects a running chain
and the stages already complete. Slurm's commands are fake scripts on PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from launcher import cli, slurm
from launcher.compose import compose_launch
from launcher.local import DONE
from launcher.plan import PPO_ACTOR_FOLDER, StagePlan, plan_pipeline, stage_folder
from launcher.render import COMPLETE_MARKER
from launcher.schema import ClusterConfig, LaunchError, StageEntry
from tests.fixtures import REPO_ROOT


def test_the_launchers_stage_folders_are_the_ones_the_stages_write():
    from offline_rlhf.config.training import AlignConfig
    from offline_rlhf.stages import rm, rm_score, seeds_report
    from ppo_baseline import stage as ppo_stage

    for method in ("mle_filter", "rwr", "dt", "dpo", "ipo", "cdpo"):
        assert stage_folder("align", {"method": method}) == AlignConfig.stage_name.fget(
            type("Cfg", (), {"method": method})())
    assert stage_folder("rm", {"eval_only": True}) == rm.EVAL_STAGE
    assert stage_folder("rm", {"eval_only": False}) == rm.STAGE
    assert stage_folder("rm-score", {}) == rm_score.STAGE
    assert stage_folder("seeds-report", {}) == seeds_report.STAGE
    assert stage_folder("ppo", {}) == ppo_stage.OUT and PPO_ACTOR_FOLDER == ppo_stage.STAGE


def align_entry(name: str | None) -> StageEntry:
    return StageEntry(stage="align", name=name, overrides=["method=dt", "model=tiny", "init.tokenizer=/tok",
                                                           "data.path=${run_dir}/mix/aligned.jsonl"])


def test_a_name_other_than_the_stages_folder_is_refused_before_anything_runs(tmp_path):
    cfg = compose_launch(["pipeline=smoke", f"run_dir={tmp_path}"])
    cfg.pipeline.stages = [cfg.pipeline.stages[0], align_entry("align_best")]
    with pytest.raises(LaunchError, match=r"^pipeline.stages\[1\].name: 'align_best' is not the folder the stage "
                                          r"writes, run_dir/align_dt; set name: align_dt or remove it$"):
        plan_pipeline(cfg)
    assert list(tmp_path.iterdir()) == []


def test_an_unnamed_align_entry_plans_the_folder_its_method_writes(tmp_path):
    """Its inputs are then checked against that folder: the eval after it reads align_dt."""
    cfg = compose_launch(["pipeline=smoke", f"run_dir={tmp_path}"])
    cfg.pipeline.stages = [align_entry(None)]
    with pytest.raises(LaunchError, match=r"^pipeline.stages\[0\] \(align_dt\) data.path: .*/mix/aligned.jsonl "
                                          r"does not exist and no earlier stage"):
        plan_pipeline(cfg)


def smoke_args(run_dir: Path) -> list[str]:
    return ["pipeline=smoke", "cluster=local_slurm", f"run_dir={run_dir}"]


def test_a_dry_run_leaves_the_stage_folders_and_markers_alone(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "smoke").mkdir(parents=True)
    (run_dir / "smoke" / "config.yaml").write_text("the stage's own\n")
    (run_dir / "smoke" / COMPLETE_MARKER).touch()
    assert cli.main([*smoke_args(run_dir), "--dry-run"]) == 0
    assert (run_dir / "smoke" / "config.yaml").read_text() == "the stage's own\n"
    assert sorted(p.name for p in (run_dir / "smoke").iterdir()) == [COMPLETE_MARKER, "config.yaml"]
    rendered = run_dir / "dry_run" / "smoke"
    assert "#SBATCH --job-name=run.smoke" in (rendered / "submission.sh").read_text()
    assert "tp: 2" in (rendered / "config.yaml").read_text()
    assert not (run_dir / "launch.json").exists()
    assert str(rendered / "submission.sh") in capsys.readouterr().out


class FakeSlurm:
    """sbatch, squeue and scancel as scripts in `bin`; each call is appended to calls.log.
    sbatch prints job ids 100, 101, ...; `behaviour` runs after it printed the id."""

    def __init__(self, tmp_path: Path, monkeypatch, behaviour: dict[int, str] | None = None, queued: str = ""):
        self.bin, self.log = tmp_path / "bin", tmp_path / "calls.log"
        self.bin.mkdir()
        cases = "".join(f"  {n}) {action};;\n" for n, action in (behaviour or {}).items())
        self._script("sbatch", f'n=$(grep -c "^sbatch" {self.log} || true)\necho "$((99 + n))"\n'
                               f'case "$n" in\n{cases}esac\n')
        self._script("squeue", f"printf '{queued}'\n")
        self._script("scancel", "")
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")

    def _script(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f'#!/bin/bash\necho "{name} $*" >> {self.log}\n{body}')
        path.chmod(0o755)

    def calls(self, command: str) -> list[str]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [line for line in lines if line.startswith(command)]


def chain(tmp_path: Path, *names: str) -> list[StagePlan]:
    return [StagePlan(name=n, stage=n, args=(), nodes=1, procs_per_node=1, stage_dir=tmp_path / "run" / n,
                      config_yaml="a: 1\n", time_limit=None) for n in names]


def test_an_sbatch_that_hangs_is_cancelled_with_every_job_before_it(tmp_path, monkeypatch):
    """The second sbatch queues job 101, prints its id and hangs: both jobs are cancelled."""
    fake = FakeSlurm(tmp_path, monkeypatch, {2: "exec sleep 30"})
    monkeypatch.setattr(slurm, "SBATCH_TIMEOUT_S", 1)
    plans = chain(tmp_path, "sft", "rm")
    scripts = [slurm.write_stage_files(plan, ClusterConfig(kind="slurm"), "python") for plan in plans]
    with pytest.raises(LaunchError) as info:
        slurm.submit_chain(plans, scripts, [[], [0]], max_attempts=1)
    assert str(info.value) == ("stage rm: sbatch: no answer in 1 s (cancelled job 101 it queued); is slurmctld "
                               "reachable? (scontrol ping); cancelled job(s) 100")
    assert fake.calls("scancel") == ["scancel 101", "scancel 100"]


def test_ctrl_c_during_submission_cancels_what_was_submitted_and_prints_one_line(tmp_path):
    """The second sbatch sends SIGINT to the launcher, as Ctrl-C in its terminal would."""
    # Python's Ctrl-C handler, also where SIGINT is ignored (a job started in the background,
    # as CI runs the suite, inherits SIGINT ignored and Python then installs none).
    program = (f"import signal, sys; from pathlib import Path; from launcher import slurm\n"
               f"signal.signal(signal.SIGINT, signal.default_int_handler)\n"
               f"from tests.unit.launcher.test_launch_review import chain\n"
               f"plans = chain(Path({str(tmp_path)!r}), 'sft', 'rm')\n"
               f"scripts = [slurm.write_stage_files(p, slurm.ClusterConfig(kind='slurm'), 'python') for p in plans]\n"
               f"try:\n    slurm.submit_chain(plans, scripts, [[], [0]], 1)\n"
               f"except slurm.LaunchError as err:\n    print(err, file=sys.stderr); sys.exit(2)\n")
    with pytest.MonkeyPatch.context() as patch:
        fake = FakeSlurm(tmp_path, patch, {2: "kill -INT $PPID; exec sleep 30"})
        proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                              cwd=REPO_ROOT)
    assert (proc.returncode, proc.stderr) == (2, "orlhf launch: interrupted while submitting; "
                                                 "cancelled job(s) 100\n")
    assert fake.calls("scancel") == ["scancel 100"]


@pytest.mark.parametrize("value", ["90", "30:00", "04:00:00", "2-12", "2-12:30", "2-12:30:00", "UNLIMITED"])
def test_slurm_time_formats_are_accepted(value):
    assert ClusterConfig(kind="slurm", time_limit=value).time_limit == value


@pytest.mark.parametrize("value", ["banana", "1:2:3:4", "2-", "-5", "4h", "04:00:000"])
def test_a_malformed_time_limit_is_refused_with_its_key(value):
    with pytest.raises(LaunchError, match=rf"^pipeline.stages\[0\].time_limit: '{value}' is not a Slurm time; use"):
        compose_launch(["pipeline=smoke", f"pipeline.stages.0.time_limit={value}"])
    with pytest.raises(LaunchError, match=rf"^cluster.time_limit: '{value}' is not a Slurm time"):
        compose_launch(["pipeline=smoke", f"cluster.time_limit={value}"])


def test_an_sbatch_error_names_the_stage_and_the_settings_only_sbatch_checks(tmp_path, monkeypatch):
    FakeSlurm(tmp_path, monkeypatch, {1: "echo 'sbatch: error: invalid account or account/partition' >&2; exit 1"})
    (plan,) = chain(tmp_path, "sft")
    with pytest.raises(LaunchError, match=r"^stage sft: sbatch: sbatch: error: invalid account or account/partition; "
                                          r"check cluster.account \(with cluster.partition\)"):
        slurm.submit_chain([plan], [Path("/x.sh")], [[]], max_attempts=1)


@pytest.mark.parametrize(("override", "hint"), [
    ("cluster.mem=10G;rm", """';' needs quotes: quote the whole value, 'cluster.mem="10G;rm"'"""),
    ("+cluster.env.FOO=a $(x)", """'(' needs quotes: quote the whole value, '+cluster.env.FOO="a $(x)"'"""),
    ("pipeline.stages.0.overrides=[lr=1e-5]", "quote list items that contain '=' or other special characters: "
                                              "key=['a=b']"),
])
def test_the_hint_for_an_unparsable_override_fits_it(override, hint):
    with pytest.raises(LaunchError) as info:
        compose_launch(["pipeline=smoke", override])
    assert str(info.value).endswith(hint)


def test_the_quoting_the_hint_suggests_parses():
    assert compose_launch(["pipeline=smoke", '+cluster.env.FOO="a $(x)"']).cluster.env["FOO"] == "a $(x)"
    with pytest.raises(LaunchError, match=r"^cluster.mem: '10G;rm' cannot go on an #SBATCH line"):  # parsed
        compose_launch(["pipeline=smoke", 'cluster.mem="10G;rm"'])


def test_the_launch_record_is_readable_by_everyone_sharing_the_folder(tmp_path):
    previous = os.umask(0o077)
    try:
        path = slurm.write_launch_record(tmp_path, "smoke", [slurm.SubmittedStage("smoke", "/x.sh", ["100"])])
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_relaunch_over_a_chain_still_queued_is_refused(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    slurm.write_launch_record(run_dir, "smoke", [slurm.SubmittedStage("smoke", "/x.sh", ["100", "101"])])
    fake = FakeSlurm(tmp_path, monkeypatch, queued="101+0\\n101+1\\n")
    assert cli.main(smoke_args(run_dir)) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"orlhf launch: error: run_dir: job(s) 101 of the launch recorded in {run_dir}/launch.json "
                            "are still pending or running; wait for them (orlhf launch status run_dir=")
    assert error.endswith(") or cancel them: scancel 101\n") and error.count("\n") == 1
    assert fake.calls("squeue") == ["squeue -h -o %i --jobs=100,101"] and fake.calls("sbatch") == []


def test_a_relaunch_submits_only_the_stages_after_those_complete(tmp_path, monkeypatch, capsys):
    fake = FakeSlurm(tmp_path, monkeypatch)
    done, changed, after = chain(tmp_path, "sft", "rm", "generate")
    for plan in (done, changed):
        plan.stage_dir.mkdir(parents=True)
        (plan.stage_dir / DONE).touch()
        (plan.stage_dir / COMPLETE_MARKER).touch()
        plan.config_file.write_text(plan.config_yaml)
    changed = replace(changed, config_yaml="a: 2\n")  # rm reruns with another config, so everything after it
    cfg = compose_launch(smoke_args(tmp_path / "run"))
    assert cli.launch_on_slurm(cfg, [done, changed, after], tmp_path / "run", "python", dry_run=False) == 0
    assert [line.split()[-1] for line in fake.calls("sbatch")] == [str(changed.stage_dir / "submission.sh"),
                                                                    str(after.stage_dir / "submission.sh")]
    assert (done.stage_dir / COMPLETE_MARKER).exists() and not (changed.stage_dir / COMPLETE_MARKER).exists()
    record = json.loads((tmp_path / "run" / "launch.json").read_text())
    assert [(s["name"], s["job_ids"]) for s in record["stages"]] == [("rm", ["100"]), ("generate", ["101"])]
    assert "sft: already complete, skipped" in capsys.readouterr().out
