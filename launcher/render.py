"""Render one stage's sbatch script. Pure: same plan and cluster config, same text.

Torchrun mode starts one task per node running torchrun with a c10d rendezvous at the first
host of the allocation; tasks mode starts one task per process and the stage reads Slurm's
variables itself (offline_rlhf.parallel.distributed). Both derive the rendezvous port as
20000 + job id % 20000, so concurrent jobs on shared nodes do not collide.
"""

from __future__ import annotations

import shlex

from launcher.plan import STAGE_MODULE, StagePlan
from launcher.schema import ClusterConfig

COMPLETE_MARKER = ".launch_complete"  # written when a continued stage has finished

RENDEZVOUS = """\
# Rendezvous at the first host of the allocation; every node derives the same port.
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
port=$((20000 + SLURM_JOB_ID % 20000))
"""


def job_name(plan: StagePlan) -> str:
    """Run and stage, so two runs' jobs differ (continuation waits on jobs of the same name)."""
    return f"{plan.stage_dir.parent.name}.{plan.name}"


def tasks_per_node(plan: StagePlan, cluster: ClusterConfig) -> int:
    return plan.procs_per_node if cluster.launch_mode == "tasks" else 1


def uses_torchrun(plan: StagePlan, cluster: ClusterConfig) -> bool:
    return cluster.launch_mode == "torchrun" and plan.world_size > 1


def render_script(plan: StagePlan, cluster: ClusterConfig, python: str) -> str:
    continued = cluster.max_attempts > 1
    sections = [
        "#!/bin/bash\n" + "".join(f"#SBATCH {d}\n" for d in sbatch_directives(plan, cluster)),
        f"# orlhf launch: stage {plan.stage!r}; resolved config: {plan.stage_dir / 'config.yaml'}\n"
        "set -euo pipefail\n",
        _skip_if_complete(plan) if continued else "",
        _environment(cluster),
        RENDEZVOUS if uses_torchrun(plan, cluster) else "",
        _run_line(plan, cluster, python) + (_mark_complete(plan) if continued else ""),
    ]
    return "\n".join(section for section in sections if section)


def sbatch_directives(plan: StagePlan, cluster: ClusterConfig) -> list[str]:
    """Unset optional settings are left out, so a CPU-only cluster needs no GPU request."""
    optional = [
        ("--gpus-per-node", cluster.gpus_per_node),
        ("--cpus-per-task", cluster.cpus_per_task),
        ("--mem", cluster.mem),
        ("--time", plan.time_limit),
        ("--partition", cluster.partition),
        ("--account", cluster.account),
    ]
    directives = [f"--job-name={job_name(plan)}", f"--nodes={plan.nodes}",
                  f"--ntasks-per-node={tasks_per_node(plan, cluster)}"]
    directives += [f"{flag}={value}" for flag, value in optional if value is not None]
    directives += ["--exclusive"] if cluster.exclusive else []
    directives += [f"--output={plan.stage_dir}/slurm-%j.out", f"--error={plan.stage_dir}/slurm-%j.err"]
    return directives


def _environment(cluster: ClusterConfig) -> str:
    return "".join(f"export {name}={shlex.quote(str(value))}\n" for name, value in cluster.env.items())


def _run_line(plan: StagePlan, cluster: ClusterConfig, python: str) -> str:
    return " \\\n  ".join([*_srun_words(plan, cluster), _program(plan, cluster, python)]) + "\n"


# Automatic continuation: later attempts of this script are queued behind it (singleton) and
# resume from the stage's latest checkpoint; once one attempt has finished the stage, the
# remaining ones exit at once.
def _skip_if_complete(plan: StagePlan) -> str:
    marker = shlex.quote(str(plan.stage_dir / COMPLETE_MARKER))
    return f"if [ -e {marker} ]; then echo {shlex.quote(f'{plan.name}: already complete')}; exit 0; fi\n"


def _mark_complete(plan: StagePlan) -> str:
    return f"touch {shlex.quote(str(plan.stage_dir / COMPLETE_MARKER))}\n"


def _srun_words(plan: StagePlan, cluster: ClusterConfig) -> list[str]:
    # srun does not inherit --cpus-per-task from the allocation (Slurm >= 22.05).
    words = ["srun --kill-on-bad-exit=1"]
    if cluster.cpus_per_task is not None:
        words[0] += f" --cpus-per-task={cluster.cpus_per_task}"
    if cluster.container_image:
        mounts = [f"{plan.stage_dir.parent}:{plan.stage_dir.parent}", *cluster.container_mounts]
        words.append(f"--container-image={shlex.quote(cluster.container_image)} "
                     f"--container-mounts={shlex.quote(','.join(mounts))} --no-container-mount-home")
    return words


def _program(plan: StagePlan, cluster: ClusterConfig, python: str) -> str:
    stage = " ".join(shlex.quote(word) for word in (STAGE_MODULE, plan.stage, *plan.args))
    if not uses_torchrun(plan, cluster):
        return f"{shlex.quote(python)} -m {stage}"
    return (f"{shlex.quote(python)} -m torch.distributed.run --nnodes={plan.nodes} "
            f"--nproc-per-node={plan.procs_per_node} \\\n  "
            '--rdzv-backend=c10d --rdzv-endpoint="$head:$port" --rdzv-id="$SLURM_JOB_ID" \\\n  '
            f"-m {stage}")
