"""Render one stage's sbatch script. Pure: same plan and cluster config, same text.

Torchrun mode starts one task per node running torchrun with a c10d rendezvous at the first
host of the allocation; tasks mode starts one task per process and the stage reads Slurm's
variables itself (offline_rlhf.parallel.distributed). Both derive the rendezvous port as
20000 + job id % 6000 (RENDEZVOUS_PORTS there), so concurrent jobs on shared nodes do not
collide, below the ports the nodes' own outgoing connections take.

The PPO stage renders as one heterogeneous job (`render_hetjob`, layout in launcher.ppo):
one `#SBATCH hetjob` component per module, the services' job steps started first (one task
per process, so rank 0, which serves HTTP, is on the first node of its component), then
the actor's, whose exit status is the job's (below).

Warning ahead of the time limit: `#SBATCH --signal=USR1@<cluster.signal_lead_s>` has Slurm
signal every process of the job's steps (not the batch shell), torchrun's workers included
(proctrack/cgroup or linuxproc follow them into their own sessions). The training loop saves
and exits on it. SIGUSR1 rather than SIGTERM: torchrun, signalled too, answers SIGTERM by
killing its workers 30 s later, mid-save for a large model (only recent torch has
--shutdown-timeout; the NGC 25.01 image's 2.6 has not). It would die of SIGUSR1, so the
step starts with SIGUSR1 ignored (IGNORE_WARNING), a disposition torchrun and the stages
inherit and only the training loop replaces.

The PPO heterogeneous job gets the same warning, and its steps start the same way: the
actor's loop (ppo_baseline.stage, with the training loop's handler) finishes its iteration,
saves, shuts its services down over HTTP (they record their ledger rows) and exits 75; the
services ignore the warning itself. The actor's exit status is the job's: once its step has
ended the services get SERVICE_GRACE_S to end (the actor tells them to; an actor that found
nothing to do may not have) and are then ended with the job; a service step that fails while
the actor runs ends the job at once.

The submitting shell's environment reaches the job (sbatch exports it): its rendezvous and
torchrun variables (launcher.schema.PROCESS_VARIABLES, TORCHELASTIC_*) are unset first, or a
stage launched from inside another job or a torchrun worker would join that one's rendezvous.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from launcher.plan import STAGE_MODULE, StagePlan, job_gpus
from launcher.ppo import GPU_OFFSET_ENV, TOKEN_ENV, TOKEN_FILE, Component, Module
from launcher.schema import PROCESS_VARIABLES, ClusterConfig

SUB_RUN = re.compile(r"(seed|round)_\d+")  # a replicate's folder (seed_<s>) or a later round's
COMPLETE_MARKER = ".launch_complete"  # written when a continued stage has finished
WARNING_SIGNAL = "USR1"
IGNORE_WARNING = f"bash -c 'trap \"\" {WARNING_SIGNAL}; exec \"$@\"' ignore-{WARNING_SIGNAL.lower()}"
SERVICE_GRACE_S = 60  # seconds the PPO services may take to end once the actor's step has ended

RENDEZVOUS = """\
# Rendezvous at the first host of the allocation; every node derives the same port.
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
port=$((20000 + SLURM_JOB_ID % 6000))
"""


def job_name(plan: StagePlan) -> str:
    """Run and stage, so two runs' jobs differ (continuation waits on jobs of the same name).
    A replicate's or a later round's name already says which."""
    return f"{run_folder(plan).name}.{plan.name}"


def run_folder(plan: StagePlan) -> Path:
    """The run's folder: the stage's parent, or above it one folder per part its name has
    before the stage's folder (run_dir/seed_<s>/round_<r>/<stage> is `seed_<s>.round_<r>.<stage>`)."""
    folder = plan.stage_dir.parent
    for part in reversed(plan.name.split(".")[:-1]):
        if not (SUB_RUN.fullmatch(part) and folder.name == part):
            break
        folder = folder.parent
    return folder


def tasks_per_node(plan: StagePlan, cluster: ClusterConfig) -> int:
    return plan.procs_per_node if cluster.launch_mode == "tasks" else 1


def uses_torchrun(plan: StagePlan, cluster: ClusterConfig) -> bool:
    return cluster.launch_mode == "torchrun" and plan.world_size > 1


def render_script(plan: StagePlan, cluster: ClusterConfig, python: str) -> str:
    if plan.components:
        return render_hetjob(plan, cluster, python)
    continued = cluster.max_attempts > 1
    sections = [
        "#!/bin/bash\n" + "".join(f"#SBATCH {d}\n" for d in sbatch_directives(plan, cluster)),
        f"# orlhf launch: stage {plan.stage!r}; resolved config: {plan.config_file}\n"
        "set -euo pipefail\n",
        _skip_if_complete(plan) if continued else "",
        _environment(cluster),
        RENDEZVOUS if uses_torchrun(plan, cluster) else "",
        _run_line(plan, cluster, python) + (_mark_complete(plan) if continued else ""),
    ]
    return "\n".join(section for section in sections if section)


def sbatch_directives(plan: StagePlan, cluster: ClusterConfig) -> list[str]:
    """Unset optional settings are left out, so a CPU-only cluster needs no GPU request."""
    directives = [f"--job-name={job_name(plan)}",
                  *_resources(plan, cluster, plan.nodes, tasks_per_node(plan, cluster))]
    if cluster.signal_lead_s:
        directives.append(f"--signal={WARNING_SIGNAL}@{cluster.signal_lead_s}")
    directives += [f"--output={plan.stage_dir}/slurm-%j.out", f"--error={plan.stage_dir}/slurm-%j.err"]
    return directives


def _resources(plan: StagePlan, cluster: ClusterConfig, nodes: int, tasks: int, cpus: int | None = None) -> list[str]:
    """What one job (or one component of a heterogeneous job) asks for; `cpus` per task. A
    CPU job (`StagePlan.cpu_only`) asks for no GPU and no whole node (not exclusive, not all
    its memory: `--mem=0`), in cluster.cpu_partition."""
    optional = [
        ("--gpus-per-node", job_gpus(plan.cpu_only, plan.gpus_per_node, cluster)),
        ("--cpus-per-task", cpus if cpus is not None else cluster.cpus_per_task),
        ("--mem", None if plan.cpu_only and cluster.mem == "0" else cluster.mem),
        ("--time", plan.time_limit),
        ("--partition", cluster.cpu_partition if plan.cpu_only and cluster.cpu_partition else cluster.partition),
        ("--account", cluster.account),
    ]
    directives = [f"--nodes={nodes}", f"--ntasks-per-node={tasks}"]
    directives += [f"{flag}={value}" for flag, value in optional if value is not None]
    return directives + (["--exclusive"] if cluster.exclusive and not plan.cpu_only else [])


def _environment(cluster: ClusterConfig) -> str:
    unset = ("# The submitting shell's rendezvous and torchrun variables would reach the stage (sbatch\n"
             "# exports them): a stage would join another job's rendezvous.\n"
             f"unset {' '.join(PROCESS_VARIABLES)} ${{!TORCHELASTIC_@}}\n")
    return unset + "".join(f"export {name}={shlex.quote(str(value))}\n" for name, value in cluster.env.items())


def _run_line(plan: StagePlan, cluster: ClusterConfig, python: str) -> str:
    words = [*_srun_words(plan, cluster), *_warning_ignored(cluster), _program(plan, cluster, python)]
    return " \\\n  ".join(words) + "\n"


def _warning_ignored(cluster: ClusterConfig) -> list[str]:
    """The wrapper a job step starts under when Slurm sends the warning (IGNORE_WARNING)."""
    return [IGNORE_WARNING] if cluster.signal_lead_s else []


# Automatic continuation: later attempts of this script are queued behind it (singleton) and
# resume from the stage's latest checkpoint; once one attempt has finished the stage, the
# remaining ones exit at once.
def _skip_if_complete(plan: StagePlan) -> str:
    marker = shlex.quote(str(plan.stage_dir / COMPLETE_MARKER))
    return f"if [ -e {marker} ]; then echo {shlex.quote(f'{plan.name}: already complete')}; exit 0; fi\n"


def _mark_complete(plan: StagePlan) -> str:
    return f"touch {shlex.quote(str(plan.stage_dir / COMPLETE_MARKER))}\n"


def _srun_words(plan: StagePlan, cluster: ClusterConfig, step: str = "", cpus: int | None = None) -> list[str]:
    # srun does not inherit --cpus-per-task from the allocation (Slurm >= 22.05).
    words = [f"srun{step} --kill-on-bad-exit=1"]
    cpus = cpus if cpus is not None else cluster.cpus_per_task
    if cpus is not None:
        words[0] += f" --cpus-per-task={cpus}"
    if cluster.container_image:
        # The whole run: a later round's stage reads the task data, the SFT/RM and earlier rounds.
        mounts = [f"{run_folder(plan)}:{run_folder(plan)}", *cluster.container_mounts]
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


def render_hetjob(plan: StagePlan, cluster: ClusterConfig, python: str) -> str:
    """The PPO stage: one component per het group, services first, then the actor."""
    services = plan.components[1:]
    header = sbatch_directives(plan, cluster)  # the actor's component (0): the stage's own nodes
    for component in services:
        tasks = max(module.procs_per_node for module in component.modules)
        header += ["hetjob", *_resources(plan, cluster, component.nodes, tasks, _service_cpus(cluster, tasks))]
    layout = ", ".join(f"{c.group} {'+'.join(c.names)} ({c.nodes} node(s))" for c in plan.components)
    steps = [_service_step(plan, cluster, python, component, module) for component in services
             for module in component.modules]
    continued = cluster.max_attempts > 1
    sections = [
        "#!/bin/bash\n" + "".join(f"#SBATCH {d}\n" for d in header),
        f"# orlhf launch: stage {plan.stage!r} as a heterogeneous job; het groups: {layout}\n"
        f"# resolved config: {plan.config_file}\nset -euo pipefail\n",
        _skip_if_complete(plan) if continued else "",
        _environment(cluster) + "# The shared secret stays in its 0600 file; the components get its path.\n"
        f"export {TOKEN_ENV}={shlex.quote(str(plan.stage_dir / TOKEN_FILE))}\n",
        "# Services first: each binds a port derived from the job id on its component's first node;\n"
        "# the actor finds them through SLURM_JOB_NODELIST_HET_GROUP_<n> and waits for their health.\n"
        "services=\n" + "".join(steps),
        (RENDEZVOUS if uses_torchrun(plan, cluster) else "") + _actor_step(plan, cluster, python),
        _wait_for_steps(SERVICE_GRACE_S) + (_mark_complete(plan) if continued else ""),
    ]
    return "\n".join(section for section in sections if section)


def _service_step(plan: StagePlan, cluster: ClusterConfig, python: str, component: Component,
                  module: Module) -> str:
    """One task per process; `--overlap`, so services sharing a component share its CPUs and
    nodes. `--ntasks` too: srun would otherwise take the component's task count from the
    job's environment (SLURM_NTASKS_HET_GROUP_<n>), its largest module's. A module after
    another in its component starts GPU_OFFSET_ENV GPUs in (Module.gpu_offset), so the two
    do not both take GPU 0, 1, ... of each node (a step sees all of them)."""
    name, per_node = module.name, module.procs_per_node
    log = plan.stage_dir / name / "service.log"
    step = (f" --het-group={component.group} --overlap --nodes={component.nodes}"
            f" --ntasks={component.nodes * per_node} --ntasks-per-node={per_node} --open-mode=append"
            f" --output={shlex.quote(str(log))}")
    serve = " ".join(shlex.quote(word) for word in (STAGE_MODULE, plan.stage, *plan.args, f"serve={name}"))
    words = _srun_words(plan, cluster, step, _service_cpus(cluster, per_node))
    if module.gpu_offset:
        words[0] = f"{GPU_OFFSET_ENV}={module.gpu_offset} {words[0]}"  # srun passes it to every task
    line = " \\\n  ".join([*words, *_warning_ignored(cluster), f"{shlex.quote(python)} -m {serve}"])
    return line + f' &\nservices+=" $!:{name}"\n'


def _service_cpus(cluster: ClusterConfig, tasks_per_node: int) -> int | None:
    """In torchrun mode cluster.cpus_per_task is the CPUs of a node's one task; a service runs
    one task per process, so its tasks split them."""
    if cluster.cpus_per_task is None or cluster.launch_mode == "tasks":
        return cluster.cpus_per_task
    return max(1, cluster.cpus_per_task // tasks_per_node)


def _actor_step(plan: StagePlan, cluster: ClusterConfig, python: str) -> str:
    words = _srun_words(plan, cluster, " --het-group=0")
    return " \\\n  ".join([*words, *_warning_ignored(cluster), _program(plan, cluster, python)]) + " &\nactor=$!\n"


def _wait_for_steps(grace_s: int) -> str:
    """`services` holds "pid:name" of each service step. Polled rather than `wait -n`, which
    cannot tell which step ended; bash reaps each step as it ends and `wait PID` gives its status."""
    return f"""\
# A service step that fails while the actor runs ends the job, and with it every other step.
# The actor's exit status is the job's: once its step has ended, the services (it tells them
# to shut down) get {grace_s} s to end; the job's end ends any still running.
ended() {{ ! kill -0 "$1" 2>/dev/null; }}
reap_services() {{  # drop the ended service steps; a failed one while the actor runs ends the job
  local left= entry code
  for entry in $services; do
    if ! ended "${{entry%%:*}}"; then left+=" $entry"; continue; fi
    wait "${{entry%%:*}}" && code=0 || code=$?
    [ "$code" -eq 0 ] && continue
    echo "orlhf launch: a PPO job step failed (the ${{entry#*:}} service, exit code $code)$1" >&2
    [ -n "$1" ] || exit "$code"
  done
  services=$left
}}
while ! ended "$actor"; do reap_services ""; sleep 1; done
wait "$actor" && actor_code=0 || actor_code=$?
deadline=$((SECONDS + {grace_s}))
while [ -n "$services" ] && [ "$SECONDS" -lt "$deadline" ]; do reap_services " after the actor ended"; sleep 1; done
[ -z "$services" ] || echo "orlhf launch: PPO service step(s) (pid:name)$services still running \\
{grace_s} s after the actor's ended; ending them" >&2
if [ "$actor_code" -ne 0 ]; then
  echo "orlhf launch: a PPO job step failed (the actor, exit code $actor_code); ending the job" >&2
  exit "$actor_code"
fi
"""
