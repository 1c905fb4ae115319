"""What a rerun may change and still resume: layout, timing and decode speed knobs, never
what the results depend on."""

import pytest

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.samples import GenerateConfig
from offline_rlhf.stage_support import check_resumable, resume_fingerprint, within_run
from ppo_baseline.config import PPOConfig


def changed_keys(stage: str, schema: type, overrides: list[str]) -> set[str]:
    base = resume_fingerprint(compose_stage(stage, schema, []))
    other = resume_fingerprint(compose_stage(stage, schema, overrides))
    return {key for key in base.keys() | other.keys() if base.get(key) != other.get(key)}


def test_a_ppo_run_resumes_under_another_service_layout_and_timing():
    # A run started locally resumes under `orlhf launch cluster=slurm` (het_group set) and the reverse.
    layout = ["services.critic.nproc=2", "services.critic.parallel.tp=2", "services.reward.batch_size=8",
              "services.reward.het_group=1", "services.host=10.0.0.5", "services.startup_timeout_s=600",
              "services.request_timeout_s=60", "services.max_body_mb=512", "generation.batch_size=64",
              "parallel.tp=2", "ppo.iterations=7", "services.share_gpus=true"]
    assert changed_keys("ppo", PPOConfig, layout) == set()
    results = ["services.critic.optim.lr=1e-5", "services.reward.checkpoint=elsewhere", "ppo.kl_coef=0.05",
               "generation.max_new_tokens=64", "generation.seed=3"]
    assert changed_keys("ppo", PPOConfig, results) == {
        "services.critic.optim.lr", "services.reward.checkpoint", "ppo.kl_coef", "generation.max_new_tokens",
        "generation.seed"}


def test_generate_resumes_with_other_decode_settings_but_not_other_sampling():
    speed = ["generation.batch_size=8", "generation.cuda_graphs=false", "generation.compile=false",
             "generation.compile_mode=coordinate-descent", "generation.decode_attention=flex", "write_every=8"]
    assert changed_keys("generate", GenerateConfig, speed) == set()
    sampling = ["generation.greedy=false", "generation.temperature=0.7", "generation.top_p=0.9", "generation.n=2",
                "max_prompt_tokens=64"]
    assert changed_keys("generate", GenerateConfig, sampling) == {
        "generation.greedy", "generation.temperature", "generation.top_p", "generation.n", "max_prompt_tokens"}


def test_paths_inside_the_run_are_compared_relative_to_it(tmp_path):
    def fingerprint(run_dir, checkpoint):
        return resume_fingerprint(compose_stage("generate", GenerateConfig, [
            f"run_dir={run_dir}", f"init.checkpoint={checkpoint}"]))

    scratch = fingerprint("/scratch/run", "/scratch/run/sft/checkpoints")
    assert scratch["init.checkpoint"] == "${run_dir}/sft/checkpoints" and scratch["run_dir"] == "/scratch/run"
    check_resumable(scratch, fingerprint("runs/b", "runs/b/sft/checkpoints"), tmp_path)  # moved, spelled relative
    for elsewhere in ("runs/b/rm/checkpoints", "/scratch/run2/sft/checkpoints"):  # a sibling is not inside the run
        with pytest.raises(ConfigError, match="^init.checkpoint: differs"):
            check_resumable(scratch, fingerprint("/scratch/run", elsewhere), tmp_path)
    older = {key: value.replace("${run_dir}", "/scratch/run") if isinstance(value, str) else value
             for key, value in scratch.items() if key != "run_dir"}  # written before paths were relative
    check_resumable(older, scratch, tmp_path)
    inside = within_run("/scratch/run")
    assert inside([{"path": "/scratch/run/task/p.jsonl"}, "/data/q.jsonl", 3]) == [
        {"path": "${run_dir}/task/p.jsonl"}, "/data/q.jsonl", 3]
    # Was: `run_dir=/scratch/run/` made `${run_dir}//task/p.jsonl`, and the resume was refused.
    slash = fingerprint("/scratch/run/", "/scratch/run//sft/checkpoints")
    assert slash["init.checkpoint"] == "${run_dir}/sft/checkpoints"
    check_resumable(scratch, slash, tmp_path)
    with pytest.raises(ConfigError, match=r"^init.checkpoint: differs from the run that wrote .* \(1 changed: "
                       r"init.checkpoint; init.checkpoint was \$\{run_dir\}/sft/checkpoints, now "
                       r"/scratch/run2/sft/checkpoints\); restore it"):
        check_resumable(scratch, fingerprint("/scratch/run", "/scratch/run2/sft/checkpoints"), tmp_path)
    assert within_run("/scratch/run/")(["/scratch/run/", "/scratch/run"]) == ["${run_dir}", "${run_dir}"]


def test_an_optional_sub_config_switched_on_or_off_is_a_change(tmp_path):
    """Was: `model.rope_scaling` None in the saved fingerprint and set now flatten to keys only
    one side has (`model.rope_scaling` / `model.rope_scaling.factor`), which were ignored as
    fields of another version of the project."""
    saved = {"model.rope_scaling": None, "optim.lr": 1e-3}
    switched = {"model.rope_scaling.factor": 8.0, "model.rope_scaling.original_max_position_embeddings": 8192,
                "optim.lr": 1e-3}
    with pytest.raises(ConfigError, match=r"^model.rope_scaling: differs from the run that wrote .*\(1 changed: "):
        check_resumable(saved, switched, tmp_path)
    with pytest.raises(ConfigError, match="^model.rope_scaling: differs"):
        check_resumable(switched, saved, tmp_path)
    check_resumable(saved, {**saved, "data.new_field": 1}, tmp_path)  # a field another version added: ignored


def test_a_training_run_resumes_with_another_micro_batch_and_ignores_an_unused_model():
    from offline_rlhf.config.training import AlignConfig, SFTConfig

    assert changed_keys("sft", SFTConfig, ["train.micro_batch=4"]) == set()  # accumulation changes no result
    demo = ["model=demo", "data.max_seq_len=128"]
    assert "model.dim" in changed_keys("sft", SFTConfig, demo)  # from scratch: the model it builds
    assert changed_keys("align", AlignConfig, demo) == {"data.max_seq_len"}  # init.checkpoint fixes the architecture
