"""conf/pipeline/offline_vs_ppo.yaml (the paper's comparison at 8B) rendered for a GPU Slurm
cluster by `orlhf launch --dry-run`: every stage validated and written (to run_dir/dry_run/), the paper's node
counts and tensor-parallel sizes, PPO as one heterogeneous job."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace

import pytest
import yaml

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from tests.fixtures import REPO_ROOT, reference_model
from tests.synthetic_preferences import MODEL, synthetic_tokenizer

pytestmark = pytest.mark.slow
STAGES = ["sft", "rm", "generate", "label", "mix", "align_mle_filter", "align_rwr", "align_dt", "ppo", "eval",
          "report"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The dry run, from a small stand-in for the imported base model (TP=4 needs 4 KV heads)."""
    root = tmp_path_factory.mktemp("offline_vs_ppo")
    synthetic_tokenizer(root / "tokenizer")
    model = replace(MODEL, n_kv_heads=4, max_seq_len=4096)
    run_dir = root / "run"
    save_checkpoint(run_dir / "base", reference_model(model, "lm", seed=0),
                    CheckpointMeta(model, "lm", TrainState(step=1)), tokenizer_dir=root / "tokenizer")
    proc = subprocess.run([sys.executable, "-m", "offline_rlhf.cli", "launch", "pipeline=offline_vs_ppo",
                           "cluster=slurm", f"run_dir={run_dir}", "--dry-run"],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert sorted(path.name for path in run_dir.iterdir()) == ["base", "dry_run"]  # no stage folder touched
    return run_dir / "dry_run"


def directives(script: str) -> list[list[str]]:
    """The #SBATCH values of each heterogeneous-job component."""
    components = [[]]
    for value in re.findall(r"^#SBATCH (.+)$", script, flags=re.M):
        components.append([]) if value == "hetjob" else components[-1].append(value)
    return components


def resolved(run_dir, stage: str) -> dict:
    return yaml.safe_load((run_dir / stage / "config.yaml").read_text())


def test_every_stage_is_rendered_on_the_papers_nodes(rendered):
    assert sorted(path.parent.name for path in rendered.glob("*/submission.sh")) == sorted(STAGES)
    for stage in ("sft", "rm", "generate", "label", "align_mle_filter", "align_rwr", "align_dt"):
        assert "--nodes=4" in directives((rendered / stage / "submission.sh").read_text())[0], stage


def test_mix_and_report_are_cpu_jobs_and_the_rest_take_whole_gpu_nodes(rendered):
    for stage in STAGES:
        [job, *_] = directives((rendered / stage / "submission.sh").read_text())
        gpu_job = stage not in ("mix", "report")
        assert ("--gpus-per-node=8" in job, "--exclusive" in job) == (gpu_job, gpu_job), stage
        assert "--ntasks-per-node=1" in job and ("--nodes=1" in job or gpu_job), stage


def test_generation_runs_at_tp1_everything_else_at_tp4(rendered):
    assert resolved(rendered, "generate")["parallel"]["tp"] == 1
    for stage in ("sft", "rm", "label", "align_dt", "ppo"):
        assert resolved(rendered, stage)["parallel"]["tp"] == 4, stage
    services = resolved(rendered, "ppo")["services"]
    assert {name: (s["nproc"], s["parallel"]["tp"], s["het_group"]) for name, s in services.items()
            if isinstance(s, dict)} == {
        "critic": (16, 4, 1), "reference": (8, 4, 2), "reward": (8, 4, 3)}


def test_ppo_is_one_heterogeneous_job_actor_8_critic_2_reference_1_reward_1(rendered):
    script = (rendered / "ppo" / "submission.sh").read_text()
    components = directives(script)
    assert [c[:2] if c[0].startswith("--nodes") else c[1:3] for c in components] == [
        ["--nodes=8", "--ntasks-per-node=1"], ["--nodes=2", "--ntasks-per-node=8"],
        ["--nodes=1", "--ntasks-per-node=8"], ["--nodes=1", "--ntasks-per-node=8"]]
    assert all("--gpus-per-node=8" in component for component in components)
    steps = re.findall(r"^srun --het-group=(\d)\b.*?(?:serve=(\w+))? &$", script, flags=re.M | re.S)
    assert [(group, serve) for group, serve in steps] == [("1", "critic"), ("2", "reference"), ("3", "reward"),
                                                          ("0", "")]
    assert "--nnodes=8 --nproc-per-node=8" in script
    assert not (rendered / "ppo" / "token").exists()  # a secret only for a job that is submitted
