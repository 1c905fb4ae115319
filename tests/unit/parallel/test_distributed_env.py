"""Detecting torchrun, Slurm and a plain single process from the environment."""

import pytest

from offline_rlhf.parallel.distributed import detect_env, first_host, slurm_port


def test_torchrun_env():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3, 8, 1, "n1", 1234, "torchrun")


def test_torchrun_wins_over_slurm():
    env = detect_env({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "16"})
    assert env.launcher == "torchrun" and env.world_size == 2


def test_slurm_one_task_per_device():
    env = detect_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "dgx[012-013]", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (9, 16, 1, "dgx012", "slurm")
    assert env.master_port == slurm_port("123456") == 20000 + 123456 % 6000


def test_single_slurm_task_is_single_process():
    assert detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"


def test_plain_process():
    env = detect_env({})
    assert (env.rank, env.world_size, env.launcher, env.is_main) == (0, 1, "single", True)


def test_first_host_of_node_lists():
    assert first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_host("node7") == "node7"
    assert first_host("a-b-1,a-b-2") == "a-b-1"
    assert first_host("rack1-[10,12]") == "rack1-10"
    assert first_host("rack[1-2]-node[01-04],login1") == "rack1-node01"  # every bracket group
    assert first_host(" dgx-[a1,b2]-x ") == "dgx-a1-x"
    for broken in ("", "gpu[1-2", "gpu]1["):
        with pytest.raises(ValueError, match="cannot parse Slurm node list"):
            first_host(broken)


def test_every_port_a_job_derives_is_below_the_ephemeral_range_and_the_script_agrees():
    """Linux hands 32768-60999 to outgoing connections (NCCL's among them): a port there may
    be taken when the job binds it. The rendered script's bash formula is the stages' own."""
    import subprocess

    from launcher.render import RENDEZVOUS
    from ppo_baseline.config import SERVICES
    from ppo_baseline.serve import service_port

    jobs = range(0, 100_000, 7)
    rendezvous = {slurm_port(str(job)) for job in jobs}
    services = {service_port(name, {"SLURM_JOB_ID": str(job)}) + own for job in jobs for name in SERVICES
                for own in (0, 1)}  # a service's HTTP port and its world's rendezvous
    assert max(rendezvous) < min(services) and max(services) < 32768
    formula = next(line for line in RENDEZVOUS.splitlines() if line.startswith("port="))
    script = f"SLURM_JOB_ID=123457; {formula}; echo $port"
    assert int(subprocess.run(["bash", "-c", script], capture_output=True, text=True).stdout) == slurm_port("123457")
