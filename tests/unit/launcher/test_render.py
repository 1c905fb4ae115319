"""Golden checks on rendered sbatch scripts (pure rendering, no Slurm needed)."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.local import local_command
from launcher.plan import StagePlan
from launcher.render import job_name, render_script, sbatch_directives
from launcher.schema import ClusterConfig

RUN_DIR = Path("/lustre/runs/dt8b")


def make_plan(name="sft", nodes=1, procs_per_node=1, args=(), time_limit=None) -> StagePlan:
    return StagePlan(name=name, stage=name, args=(*args, f"run_dir={RUN_DIR}"), nodes=nodes,
                     procs_per_node=procs_per_node, stage_dir=RUN_DIR / name, config_yaml="",
                     time_limit=time_limit)


def gpu_cluster(**changes) -> ClusterConfig:
    settings = dict(kind="slurm", partition="batch", account="llm", gpus_per_node=8, cpus_per_task=64,
                    mem="0", time_limit="04:00:00", exclusive=True,
                    container_image="nvcr.io/nvidia/pytorch:25.01-py3", container_mounts=["/data:/data"],
                    env={"NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "ib0,eth0"})
    return ClusterConfig(**{**settings, **changes})


FOUR_NODE_GOLDEN = """\
#!/bin/bash
#SBATCH --job-name=dt8b.sft
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --partition=batch
#SBATCH --account=llm
#SBATCH --exclusive
#SBATCH --signal=USR1@120
#SBATCH --output=/lustre/runs/dt8b/sft/slurm-%j.out
#SBATCH --error=/lustre/runs/dt8b/sft/slurm-%j.err

# orlhf launch: stage 'sft'; resolved config: /lustre/runs/dt8b/sft/config.yaml
set -euo pipefail

# The submitting shell's rendezvous and torchrun variables would reach the stage (sbatch
# exports them): a stage would join another job's rendezvous.
unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE ROLE_RANK ROLE_NAME ROLE_WORLD_SIZE ${!TORCHELASTIC_@}
export NCCL_DEBUG=WARN
export NCCL_SOCKET_IFNAME=ib0,eth0

# Rendezvous at the first host of the allocation; every node derives the same port.
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
port=$((20000 + SLURM_JOB_ID % 6000))

srun --kill-on-bad-exit=1 --cpus-per-task=64 \\
  --container-image=nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts=/lustre/runs/dt8b:/lustre/runs/dt8b,/data:/data --no-container-mount-home \\
  bash -c 'trap "" USR1; exec "$@"' ignore-usr1 \\
  python -m torch.distributed.run --nnodes=4 --nproc-per-node=8 \\
  --rdzv-backend=c10d --rdzv-endpoint="$head:$port" --rdzv-id="$SLURM_JOB_ID" \\
  -m offline_rlhf.cli sft parallel=tp4_sp 'data.path=/data/my file.jsonl' run_dir=/lustre/runs/dt8b
"""


def test_four_node_eight_gpu_container_stage_golden():
    plan = make_plan(nodes=4, procs_per_node=8, args=("parallel=tp4_sp", "data.path=/data/my file.jsonl"),
                     time_limit="04:00:00")
    assert render_script(plan, gpu_cluster(), python="python") == FOUR_NODE_GOLDEN


CPU_SINGLE_PROCESS_GOLDEN = """\
#!/bin/bash
#SBATCH --job-name=dt8b.mix
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=USR1@120
#SBATCH --output=/lustre/runs/dt8b/mix/slurm-%j.out
#SBATCH --error=/lustre/runs/dt8b/mix/slurm-%j.err

# orlhf launch: stage 'mix'; resolved config: /lustre/runs/dt8b/mix/config.yaml
set -euo pipefail

# The submitting shell's rendezvous and torchrun variables would reach the stage (sbatch
# exports them): a stage would join another job's rendezvous.
unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE ROLE_RANK ROLE_NAME ROLE_WORLD_SIZE ${!TORCHELASTIC_@}

srun --kill-on-bad-exit=1 \\
  bash -c 'trap "" USR1; exec "$@"' ignore-usr1 \\
  /venv/bin/python -m offline_rlhf.cli mix run_dir=/lustre/runs/dt8b
"""


def test_single_process_cpu_stage_golden():
    """No GPU request, no rendezvous, no torchrun, every optional directive left out (the
    warning signal is on by default)."""
    script = render_script(make_plan(name="mix"), ClusterConfig(kind="slurm"), python="/venv/bin/python")
    assert script == CPU_SINGLE_PROCESS_GOLDEN


def test_the_time_limit_warning_is_a_setting():
    """(The PPO heterogeneous job gets it too: test_render_hetjob.py.)"""
    directives = sbatch_directives(make_plan(time_limit="04:00:00"), gpu_cluster(signal_lead_s=600))
    assert directives[directives.index("--exclusive") + 1] == "--signal=USR1@600"  # steps, not B: (batch shell)
    script = render_script(make_plan(), gpu_cluster(signal_lead_s=0), python="python")
    assert "--signal" not in script and "trap" not in script


SURVIVES_WARNING = """
import os, signal, subprocess, sys
# torchrun starts its workers in sessions of their own; Slurm signals them all the same.
child = subprocess.run([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGUSR1).name)"],
                       start_new_session=True, capture_output=True, text=True)
os.kill(os.getpid(), signal.SIGUSR1)
print("survived; worker:", child.stdout.strip())
"""


@pytest.mark.parametrize("lead", [120, 0])
def test_the_step_ignores_the_warning_so_torchrun_survives_it(tmp_path, lead):
    """What srun runs (the wrapper, then a program that does not handle SIGUSR1, as torchrun)
    lives through Slurm's warning; its children inherit the ignore until the training loop
    installs its handler. Without the wrapper the program dies of the signal."""
    script = render_script(make_plan(name="mix"), ClusterConfig(kind="slurm", signal_lead_s=lead),
                           python=sys.executable)
    run_line = script[script.index("srun "):].replace("srun --kill-on-bad-exit=1 \\\n  ", "")
    program = run_line.replace("-m offline_rlhf.cli mix run_dir=/lustre/runs/dt8b", f"-c {shlex.quote(SURVIVES_WARNING)}")
    proc = subprocess.run(["bash", "-c", program], capture_output=True, text=True, cwd=tmp_path)
    if lead:
        assert (proc.returncode, proc.stdout) == (0, "survived; worker: SIG_IGN\n"), proc.stderr
    else:
        assert proc.returncode == -signal.SIGUSR1 and proc.stdout == ""


def test_tasks_mode_starts_one_task_per_gpu_and_lets_the_stage_rendezvous():
    script = render_script(make_plan(nodes=4, procs_per_node=8), gpu_cluster(launch_mode="tasks"), python="python")
    assert "#SBATCH --ntasks-per-node=8\n" in script
    assert "torch.distributed.run" not in script and "head=" not in script
    assert script.endswith("  python -m offline_rlhf.cli sft run_dir=/lustre/runs/dt8b\n")


def test_script_exports_nothing_that_hides_slurm_variables():
    script = render_script(make_plan(nodes=4, procs_per_node=8), gpu_cluster(), python="python")
    exported = [line.split()[1].split("=")[0] for line in script.splitlines() if line.startswith("export ")]
    assert exported == ["NCCL_DEBUG", "NCCL_SOCKET_IFNAME"]
    assert "--export" not in script


def test_auto_continuation_skips_a_completed_stage_and_marks_completion():
    script = render_script(make_plan(time_limit="04:00:00"), gpu_cluster(max_attempts=3), python="python")
    marker = "/lustre/runs/dt8b/sft/.launch_complete"
    assert f"set -euo pipefail\n\nif [ -e {marker} ]; then echo 'sft: already complete'; exit 0; fi\n" in script
    assert script.endswith(f"run_dir=/lustre/runs/dt8b\ntouch {marker}\n")


def test_stage_time_limit_and_no_container():
    directives = sbatch_directives(make_plan(time_limit="1-00:00:00"), gpu_cluster(container_image=None))
    assert "--time=1-00:00:00" in directives
    script = render_script(make_plan(), gpu_cluster(container_image=None), python="python")
    assert "--container" not in script


def test_local_command_uses_torchrun_only_for_several_processes():
    assert local_command(make_plan(name="mix"), "py") == ["py", "-m", "offline_rlhf.cli", "mix", f"run_dir={RUN_DIR}"]
    assert local_command(make_plan(name="smoke", procs_per_node=2), "py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "offline_rlhf.cli", "smoke", f"run_dir={RUN_DIR}"]


def test_job_names_are_run_then_stage_also_for_a_later_rounds_stage():
    first = make_plan("generate")
    later = replace(first, name="round_2.generate", stage_dir=RUN_DIR / "round_2" / "generate")
    dotted = replace(first, name="align.dt", stage_dir=RUN_DIR / "align.dt")  # a dotted name of the user's
    # A run folder named like the start of a dotted stage name is still the run's folder.
    same = replace(first, name="dt8b.v2", stage_dir=RUN_DIR / "dt8b.v2")
    assert [job_name(plan) for plan in (first, later, dotted, same)] == [
        f"{RUN_DIR.name}.generate", f"{RUN_DIR.name}.round_2.generate", f"{RUN_DIR.name}.align.dt", "dt8b.dt8b.v2"]


def test_a_later_rounds_container_mounts_the_whole_run():
    """Round 2's stages read the task data, the SFT/RM and round 1's policy: the run's folder is
    mounted, not run_dir/round_2."""
    later = replace(make_plan("generate"), name="round_2.generate", stage_dir=RUN_DIR / "round_2" / "generate")
    script = render_script(later, gpu_cluster(), "python")
    assert f"--container-mounts={RUN_DIR}:{RUN_DIR},/data:/data" in script and "round_2:" not in script
