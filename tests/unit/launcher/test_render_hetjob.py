"""Golden checks on the PPO stage rendered as one Slurm heterogeneous job (launcher.ppo):
directives per component, one srun per het group, container flags, no secret in the script."""
# ruff: noqa: E501  (golden scripts are compared line for line)

from __future__ import annotations

import pytest

from launcher.compose import compose_launch
from launcher.plan import StagePlan
from launcher.ppo import TOKEN_FILE, Module, placement, placement_overrides, ppo_components
from launcher.render import render_script
from launcher.schema import ClusterConfig, LaunchError, PPOComponents
from launcher.slurm import write_stage_files
from tests.unit.launcher.test_render import RUN_DIR, gpu_cluster

# The paper's layout at 8B (conf/pipeline/offline_vs_ppo.yaml): actor 8 nodes, critic 2,
# reference and reward model 1 each, 8 GPUs a node.
PAPER_SERVICES = {"critic": {"nproc": 16}, "reference": {"nproc": 8}, "reward": {"nproc": 8}}


def ppo_plan(layout: PPOComponents, services: dict, actor_nodes: int = 1, actor_per_node: int = 1,
             stage_dir=RUN_DIR / "ppo", extra=(), time_limit=None) -> StagePlan:
    args = (*extra, *placement_overrides(layout), f"run_dir={stage_dir.parent}")
    return StagePlan(name="ppo", stage="ppo", args=args, nodes=actor_nodes, procs_per_node=actor_per_node,
                     stage_dir=stage_dir, config_yaml="", time_limit=time_limit,
                     components=ppo_components("pipeline.stages[0]", layout, Module("actor", actor_per_node),
                                               actor_nodes, services))


# How each PPO golden ends: the script follows the actor's step (render._wait_for_steps).
WAIT_FOR_THE_ACTOR = """\
# A service step that fails while the actor runs ends the job, and with it every other step.
# The actor's exit status is the job's: once its step has ended, the services (it tells them
# to shut down) get 60 s to end; the job's end ends any still running.
ended() { ! kill -0 "$1" 2>/dev/null; }
reap_services() {  # drop the ended service steps; a failed one while the actor runs ends the job
  local left= entry code
  for entry in $services; do
    if ! ended "${entry%%:*}"; then left+=" $entry"; continue; fi
    wait "${entry%%:*}" && code=0 || code=$?
    [ "$code" -eq 0 ] && continue
    echo "orlhf launch: a PPO job step failed (the ${entry#*:} service, exit code $code)$1" >&2
    [ -n "$1" ] || exit "$code"
  done
  services=$left
}
while ! ended "$actor"; do reap_services ""; sleep 1; done
wait "$actor" && actor_code=0 || actor_code=$?
deadline=$((SECONDS + 60))
while [ -n "$services" ] && [ "$SECONDS" -lt "$deadline" ]; do reap_services " after the actor ended"; sleep 1; done
[ -z "$services" ] || echo "orlhf launch: PPO service step(s) (pid:name)$services still running \\
60 s after the actor's ended; ending them" >&2
if [ "$actor_code" -ne 0 ]; then
  echo "orlhf launch: a PPO job step failed (the actor, exit code $actor_code); ending the job" >&2
  exit "$actor_code"
fi
"""


PAPER_GOLDEN = """\
#!/bin/bash
#SBATCH --job-name=dt8b.ppo
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --partition=batch
#SBATCH --account=llm
#SBATCH --exclusive
#SBATCH --signal=USR1@120
#SBATCH --output=/lustre/runs/dt8b/ppo/slurm-%j.out
#SBATCH --error=/lustre/runs/dt8b/ppo/slurm-%j.err
#SBATCH hetjob
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --partition=batch
#SBATCH --account=llm
#SBATCH --exclusive
#SBATCH hetjob
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --partition=batch
#SBATCH --account=llm
#SBATCH --exclusive
#SBATCH hetjob
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --partition=batch
#SBATCH --account=llm
#SBATCH --exclusive

# orlhf launch: stage 'ppo' as a heterogeneous job; het groups: 0 actor (8 node(s)), 1 critic (2 node(s)), 2 reference (1 node(s)), 3 reward (1 node(s))
# resolved config: /lustre/runs/dt8b/ppo_actor/config.yaml
set -euo pipefail

# The submitting shell's rendezvous and torchrun variables would reach the stage (sbatch
# exports them): a stage would join another job's rendezvous.
unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE ROLE_RANK ROLE_NAME ROLE_WORLD_SIZE ${!TORCHELASTIC_@}
export NCCL_DEBUG=WARN
export NCCL_SOCKET_IFNAME=ib0,eth0
# The shared secret stays in its 0600 file; the components get its path.
export PPO_TOKEN_FILE=/lustre/runs/dt8b/ppo/token

# Services first: each binds a port derived from the job id on its component's first node;
# the actor finds them through SLURM_JOB_NODELIST_HET_GROUP_<n> and waits for their health.
services=
srun --het-group=1 --overlap --nodes=2 --ntasks=16 --ntasks-per-node=8 --open-mode=append --output=/lustre/runs/dt8b/ppo/critic/service.log --kill-on-bad-exit=1 --cpus-per-task=8 \\
  --container-image=nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts=/lustre/runs/dt8b:/lustre/runs/dt8b,/data:/data --no-container-mount-home \\
  bash -c 'trap "" USR1; exec "$@"' ignore-usr1 \\
  python -m offline_rlhf.cli ppo services.critic.parallel.tp=4 services.critic.het_group=1 services.reference.het_group=2 services.reward.het_group=3 run_dir=/lustre/runs/dt8b serve=critic &
services+=" $!:critic"
srun --het-group=2 --overlap --nodes=1 --ntasks=8 --ntasks-per-node=8 --open-mode=append --output=/lustre/runs/dt8b/ppo/reference/service.log --kill-on-bad-exit=1 --cpus-per-task=8 \\
  --container-image=nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts=/lustre/runs/dt8b:/lustre/runs/dt8b,/data:/data --no-container-mount-home \\
  bash -c 'trap "" USR1; exec "$@"' ignore-usr1 \\
  python -m offline_rlhf.cli ppo services.critic.parallel.tp=4 services.critic.het_group=1 services.reference.het_group=2 services.reward.het_group=3 run_dir=/lustre/runs/dt8b serve=reference &
services+=" $!:reference"
srun --het-group=3 --overlap --nodes=1 --ntasks=8 --ntasks-per-node=8 --open-mode=append --output=/lustre/runs/dt8b/ppo/reward/service.log --kill-on-bad-exit=1 --cpus-per-task=8 \\
  --container-image=nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts=/lustre/runs/dt8b:/lustre/runs/dt8b,/data:/data --no-container-mount-home \\
  bash -c 'trap "" USR1; exec "$@"' ignore-usr1 \\
  python -m offline_rlhf.cli ppo services.critic.parallel.tp=4 services.critic.het_group=1 services.reference.het_group=2 services.reward.het_group=3 run_dir=/lustre/runs/dt8b serve=reward &
services+=" $!:reward"

# Rendezvous at the first host of the allocation; every node derives the same port.
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
port=$((20000 + SLURM_JOB_ID % 6000))
srun --het-group=0 --kill-on-bad-exit=1 --cpus-per-task=64 \\
  --container-image=nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts=/lustre/runs/dt8b:/lustre/runs/dt8b,/data:/data --no-container-mount-home \\
  bash -c 'trap "" USR1; exec "$@"' ignore-usr1 \\
  python -m torch.distributed.run --nnodes=8 --nproc-per-node=8 \\
  --rdzv-backend=c10d --rdzv-endpoint="$head:$port" --rdzv-id="$SLURM_JOB_ID" \\
  -m offline_rlhf.cli ppo services.critic.parallel.tp=4 services.critic.het_group=1 services.reference.het_group=2 services.reward.het_group=3 run_dir=/lustre/runs/dt8b &
actor=$!

""" + WAIT_FOR_THE_ACTOR


def test_paper_layout_four_components_with_containers_golden():
    plan = ppo_plan(PPOComponents(critic_nodes=2), PAPER_SERVICES, actor_nodes=8, actor_per_node=8,
                    extra=("services.critic.parallel.tp=4",), time_limit="04:00:00")
    assert render_script(plan, gpu_cluster(), python="python") == PAPER_GOLDEN


TWO_NODE_GOLDEN = """\
#!/bin/bash
#SBATCH --job-name=dt8b.ppo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --partition=debug
#SBATCH --signal=USR1@120
#SBATCH --output=/lustre/runs/dt8b/ppo/slurm-%j.out
#SBATCH --error=/lustre/runs/dt8b/ppo/slurm-%j.err
#SBATCH hetjob
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --partition=debug

# orlhf launch: stage 'ppo' as a heterogeneous job; het groups: 0 actor (1 node(s)), 1 critic+reward (1 node(s))
# resolved config: /lustre/runs/dt8b/ppo_actor/config.yaml
set -euo pipefail

# The submitting shell's rendezvous and torchrun variables would reach the stage (sbatch
# exports them): a stage would join another job's rendezvous.
unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE ROLE_RANK ROLE_NAME ROLE_WORLD_SIZE ${!TORCHELASTIC_@}
export OMP_NUM_THREADS=1
# The shared secret stays in its 0600 file; the components get its path.
export PPO_TOKEN_FILE=/lustre/runs/dt8b/ppo/token

# Services first: each binds a port derived from the job id on its component's first node;
# the actor finds them through SLURM_JOB_NODELIST_HET_GROUP_<n> and waits for their health.
services=
srun --het-group=1 --overlap --nodes=1 --ntasks=1 --ntasks-per-node=1 --open-mode=append --output=/lustre/runs/dt8b/ppo/critic/service.log --kill-on-bad-exit=1 \\
  bash -c 'trap "" USR1; exec "$@"' ignore-usr1 \\
  /venv/bin/python -m offline_rlhf.cli ppo services.critic.het_group=1 services.reward.het_group=1 run_dir=/lustre/runs/dt8b serve=critic &
services+=" $!:critic"
PPO_GPU_OFFSET=1 srun --het-group=1 --overlap --nodes=1 --ntasks=1 --ntasks-per-node=1 --open-mode=append --output=/lustre/runs/dt8b/ppo/reward/service.log --kill-on-bad-exit=1 \\
  bash -c 'trap "" USR1; exec "$@"' ignore-usr1 \\
  /venv/bin/python -m offline_rlhf.cli ppo services.critic.het_group=1 services.reward.het_group=1 run_dir=/lustre/runs/dt8b serve=reward &
services+=" $!:reward"

srun --het-group=0 --kill-on-bad-exit=1 \\
  bash -c 'trap "" USR1; exec "$@"' ignore-usr1 \\
  /venv/bin/python -m offline_rlhf.cli ppo services.critic.het_group=1 services.reward.het_group=1 run_dir=/lustre/runs/dt8b &
actor=$!

""" + WAIT_FOR_THE_ACTOR


def test_two_node_layout_critic_with_reward_and_reference_with_actor_golden():
    """The layout the local two-node Slurm runs: the actor starts the reference itself (no
    step, no het_group override); critic and reward share one component, one step each,
    the reward model's starting one GPU in, after the critic's (PPO_GPU_OFFSET)."""
    plan = ppo_plan(PPOComponents(reward_with_critic=True, reference_with_actor=True),
                    {"critic": {"nproc": 1}, "reward": {"nproc": 1}})
    cluster = ClusterConfig(kind="slurm", partition="debug", env={"OMP_NUM_THREADS": "1"})
    assert render_script(plan, cluster, python="/venv/bin/python") == TWO_NODE_GOLDEN


def test_placement_puts_each_module_in_one_group():
    assert placement(PPOComponents()) == [("actor",), ("critic",), ("reference",), ("reward",)]
    assert placement(PPOComponents(reward_with_critic=True)) == [("actor",), ("critic", "reward"), ("reference",)]
    assert placement_overrides(PPOComponents(reference_with_actor=True)) == [
        "services.critic.het_group=1", "services.reward.het_group=2"]


def test_service_processes_must_split_over_their_nodes():
    with pytest.raises(LaunchError, match=r"pipeline.stages\[0\].ppo: services.critic.nproc=3 does not split evenly"):
        ppo_plan(PPOComponents(critic_nodes=2), {"critic": {"nproc": 3}})


def test_a_shared_component_asks_for_its_largest_module_and_splits_cpus_per_process():
    plan = ppo_plan(PPOComponents(reward_with_critic=True, critic_nodes=2),
                    {"critic": {"nproc": 16}, "reward": {"nproc": 4}, "reference": {"nproc": 8}})
    script = render_script(plan, gpu_cluster(container_image=None), python="python")
    second = script.split("#SBATCH hetjob\n")[1]
    assert second.startswith("#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=8\n#SBATCH --gpus-per-node=8\n"
                             "#SBATCH --cpus-per-task=8\n")
    assert "--het-group=1 --overlap --nodes=2 --ntasks=4 --ntasks-per-node=2 " in script  # reward: 4 processes on 2 nodes
    assert ("--ntasks-per-node=2 --open-mode=append --output=/lustre/runs/dt8b/ppo/reward/service.log --kill-on-bad-exit=1 "
            "--cpus-per-task=32 ") in script


def test_modules_sharing_a_component_take_different_gpus_of_each_node():
    """Was: critic and reward model, both steps seeing the node's 8 GPUs, both took GPU local
    rank, 0-3 each (4 GPUs idle): the reward model's step now starts 4 GPUs in."""
    services = {"critic": {"nproc": 8}, "reward": {"nproc": 8}, "reference": {"nproc": 8}}
    plan = ppo_plan(PPOComponents(reward_with_critic=True, critic_nodes=2), services)
    assert [(m.name, m.procs_per_node, m.gpu_offset) for m in plan.components[1].modules] == [
        ("critic", 4, 0), ("reward", 4, 4)]
    script = render_script(plan, gpu_cluster(container_image=None), python="python")
    critic, reward, reference = (line for line in script.splitlines() if "srun --het-group=" in line
                                 and "--het-group=0" not in line)
    assert critic.startswith("srun --het-group=1 --overlap --nodes=2 --ntasks=8 --ntasks-per-node=4 ")
    assert reward.startswith("PPO_GPU_OFFSET=4 srun --het-group=1 --overlap --nodes=2 --ntasks=8 --ntasks-per-node=4 ")
    assert reference.startswith("srun --het-group=2 ")  # a component of its own: from GPU 0
    shared = ppo_plan(PPOComponents(reward_with_critic=True), {**services, "share_gpus": True})
    assert [m.gpu_offset for m in shared.components[1].modules] == [0, 0]
    assert "PPO_GPU_OFFSET" not in render_script(shared, gpu_cluster(), python="python")


def test_a_node_whose_modules_need_more_gpus_than_it_has_is_refused_before_queueing():
    def components(layout, services, actor_per_node=8, gpus=8):
        return ppo_components("pipeline.stages[0]", layout, Module("actor", actor_per_node), 1, services, gpus)

    fix = ("; lower the entry's nproc or services.NAME.nproc, give the component more nodes, place the modules "
           "apart (reward_with_critic, reference_with_actor: false), or set services.share_gpus=true to let a "
           "node's modules share its GPUs")
    with pytest.raises(LaunchError) as error:
        components(PPOComponents(reward_with_critic=True), {"critic": {"nproc": 8}, "reward": {"nproc": 2}})
    assert str(error.value) == ("pipeline.stages[0].ppo: the critic 8 + reward 2 process(es) of one node need 10 "
                                "GPUs, one each, but a node has 8 (gpus_per_node)" + fix)
    with pytest.raises(LaunchError, match=r"the actor 8 \+ reference 1 process\(es\) of one node need 9 GPUs"):
        components(PPOComponents(reference_with_actor=True), {})  # the actor on every GPU, by default
    with pytest.raises(LaunchError, match=r"the critic 16 process\(es\) of one node need 16 GPUs"):
        components(PPOComponents(), {"critic": {"nproc": 16}})
    # What fits, what shares on request, and a cluster that asks for no GPUs (gpus None):
    components(PPOComponents(reward_with_critic=True, reference_with_actor=True),
               {"critic": {"nproc": 4}, "reward": {"nproc": 4}, "reference": {"nproc": 2}}, actor_per_node=6)
    components(PPOComponents(reward_with_critic=True, reference_with_actor=True),
               {"critic": {"nproc": 8}, "reward": {"nproc": 8}, "share_gpus": True})
    components(PPOComponents(reward_with_critic=True, reference_with_actor=True), {}, gpus=None)


def test_orlhf_launch_refuses_a_ppo_layout_its_nodes_gpus_do_not_hold(tmp_path):
    """The launcher plans with the cluster's gpus_per_node: one line, nothing written or queued."""
    import subprocess
    import sys

    from tests.fixtures import REPO_ROOT

    def launch(overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "offline_rlhf.cli", "launch", "pipeline=smoke", "cluster=slurm",
                               "cluster.gpus_per_node=8", f"run_dir={tmp_path / 'run'}", "--dry-run",
                               f"pipeline.stages=[{{stage: ppo, overrides: [{overrides}], ppo: {{reward_with_critic: "
                               "true}}]"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)

    proc = launch("'services.critic.nproc=8', 'services.reward.nproc=2'")
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith(
        "orlhf launch: error: pipeline.stages[0].ppo: the critic 8 + reward 2 process(es) of one node need 10 GPUs, "
        "one each, but a node has 8 (gpus_per_node); "), proc.stderr
    assert not (tmp_path / "run").exists()
    shared = launch("'services.critic.nproc=8', 'services.reward.nproc=2', 'services.share_gpus=true'")
    assert "init.checkpoint" in shared.stderr and "GPUs" not in shared.stderr  # past the layout: no checkpoints


def test_the_token_is_a_0600_file_beside_the_script_and_never_in_it(tmp_path):
    plan = ppo_plan(PPOComponents(), {}, stage_dir=tmp_path / "ppo")
    script = write_stage_files(plan, ClusterConfig(kind="slurm"), "python").read_text()
    token_file = tmp_path / "ppo" / TOKEN_FILE
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token not in script
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert f"export PPO_TOKEN_FILE={token_file}\n" in script
    assert all((tmp_path / "ppo" / name).is_dir() for name in ("critic", "reference", "reward"))
    write_stage_files(plan, ClusterConfig(kind="slurm"), "python")
    assert token_file.read_text().strip() != token  # every launch gets a new secret


def test_the_ppo_section_is_checked_with_its_key():
    with pytest.raises(LaunchError, match=r"pipeline.stages\[0\].ppo.critic_nodes: must be >= 1, got 0"):
        compose_launch(["pipeline=smoke", "pipeline.stages=[{stage: ppo, ppo: {critic_nodes: 0}}]"])


def test_automatic_continuation_skips_a_completed_ppo_stage_and_marks_completion():
    plan = ppo_plan(PPOComponents(), PAPER_SERVICES, time_limit="04:00:00")
    script = render_script(plan, gpu_cluster(max_attempts=2), python="python")
    marker = "/lustre/runs/dt8b/ppo/.launch_complete"
    assert f"set -euo pipefail\n\nif [ -e {marker} ]; then echo 'ppo: already complete'; exit 0; fi\n" in script
    assert script.endswith(f"fi\ntouch {marker}\n")  # after the actor's status is known to be 0
