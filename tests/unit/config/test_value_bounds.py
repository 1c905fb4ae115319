"""Values out of range are refused when the config is composed, in one line naming the key
and the fix: not a traceback, a silent degenerate run or an hours-long hang later."""

import pytest

from offline_rlhf.cli import STAGES, _load, main
from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import RopeScalingConfig

# What a stage needs besides its conf/stage defaults to compose at all.
REQUIRED = {"judge": ["judge.model=m", "questions=q.jsonl", "judge_prompts=p.jsonl"], "serve": ["ckpt=c"],
            "rm-score": ["ckpt=c", "input=in.jsonl", "output=out.jsonl"]}
TWO_A = "[{name: a, format: jsonl, path: x.jsonl}, {name: a, format: jsonl, path: y.jsonl}]"
TWO_A_PROMPTS = "[{name: a, path: x.jsonl}, {name: a, path: y.jsonl}]"
SEED = "must be in 0..4294967295, got {}; use a 32-bit seed, e.g. 1234"
WEEK = "must be <= 604800, got 1000000000000.0; seconds: at most a week"
BIG = "1000000000000"

CASES = [
    # 1. attention head counts and sizes
    ("n_kv_heads_zero", "smoke", ["model.n_kv_heads=0"],
     "model.n_kv_heads: must be >= 1, got 0; null for as many as model.n_heads"),
    ("n_kv_heads_negative", "smoke", ["model.n_kv_heads=-2"],
     "model.n_kv_heads: must be >= 1, got -2; null for as many as model.n_heads"),
    ("head_dim_zero", "smoke", ["model.head_dim=0"], "model.head_dim: must be >= 2, got 0; null for model.dim // "
                                                     "model.n_heads"),
    ("head_dim_negative", "smoke", ["model.head_dim=-2"],
     "model.head_dim: must be >= 2, got -2; null for model.dim // model.n_heads"),
    # 2. the model's other numbers
    ("rope_theta", "smoke", ["model.rope_theta=0"], "model.rope_theta: must be positive, got 0.0"),
    ("norm_eps_zero", "smoke", ["model.norm_eps=0"], "model.norm_eps: must be positive, got 0.0"),
    ("norm_eps_negative", "sft", ["model.norm_eps=-1e-5"], "model.norm_eps: must be positive, got -1e-05"),
    ("init_std", "smoke", ["model.init_std=-0.02"], "model.init_std: must be positive, got -0.02"),
    ("window_layers_from", "smoke", ["model.window_layers_from=-1"], "model.window_layers_from: must be >= 0, got -1"),
    # 3. data.total_samples
    ("sft_total_samples_zero", "sft", ["data.total_samples=0"], "data.total_samples: must be >= 1 or null, got 0; "
                                                               "set data.total_samples=null for every record once"),
    ("rm_total_samples_negative", "rm", ["data.total_samples=-1"],
     "data.total_samples: must be >= 1 or null, got -1; set data.total_samples=null for every record once"),
    # 4. source names and prompt-source weights
    ("sft_sources_twice", "sft", [f"data.sources={TWO_A}"], "data.sources[a].name: names two sources; give each "
                                                            "source its own name (the key of its counts in the "
                                                            "dataset card)"),
    ("rm_sources_twice", "rm", [f"data.sources={TWO_A}"], "data.sources[a].name: names two sources; give each "
                                                          "source its own name (the key of its counts in the "
                                                          "dataset card)"),
    ("generate_sources_twice", "generate", [f"sources={TWO_A_PROMPTS}"],
     "sources[a].name: names two sources; give each source its own name (the key of its counts)"),
    ("ppo_sources_twice", "ppo", [f"sources={TWO_A_PROMPTS}"],
     "sources[a].name: names two sources; give each source its own name (the key of its counts)"),
    ("generate_weight_zero", "generate", ["sources=[{name: a, path: x.jsonl, weight: 0}]"],
     "sources[a].weight: must be > 0, got 0.0; give it a positive share, or remove the source"),
    ("ppo_weight_negative", "ppo", ["sources=[{name: a, path: x.jsonl, weight: -1}]"],
     "sources[a].weight: must be > 0, got -1.0; give it a positive share, or remove the source"),
    # 5. rm without sources
    ("rm_no_sources", "rm", ["data.sources=[]"], "data.sources: is empty; list at least one source (see conf/data/)"),
    # 6. every seed key
    ("train_seed_past_64_bits", "sft", ["train.seed=18446744073709551616"],
     "train.seed: " + SEED.format(18446744073709551616)),
    ("train_seed_below_int64", "rm", ["train.seed=-9223372036854775809"],
     "train.seed: " + SEED.format(-9223372036854775809)),
    ("align_seed_negative", "align", ["train.seed=-1"], "train.seed: " + SEED.format(-1)),
    ("generation_seed", "generate", ["generation.seed=4294967296"], "generation.seed: " + SEED.format(4294967296)),
    ("generate_seed", "generate", ["seed=-1"], "seed: " + SEED.format(-1)),
    ("eval_generation_seed", "eval", ["generation.seed=-5"], "generation.seed: " + SEED.format(-5)),
    ("ppo_seed", "ppo", ["seed=18446744073709551616"], "seed: " + SEED.format(18446744073709551616)),
    ("task_seed", "task", ["seed=-1"], "seed: " + SEED.format(-1)),
    ("label_seed", "label", ["seed=4294967296"], "seed: " + SEED.format(4294967296)),
    ("mix_seed", "mix", ["seed=-3"], "seed: " + SEED.format(-3)),
    ("reference_seed", "reference", ["seed=18446744073709551615"], "seed: " + SEED.format(18446744073709551615)),
    ("judge_seed", "judge", ["seed=-1"], "seed: " + SEED.format(-1)),
    ("smoke_seed", "smoke", ["seed=4294967296"], "seed: " + SEED.format(4294967296)),
    # 8. the task's tokenizer and flaw weights
    ("task_vocab_size", "task", [f"vocab_size={BIG}"],
     f"vocab_size: must be <= 1000000, got {BIG}; the task's corpus runs out of merges far sooner"),
    ("task_flaw_weights_inf", "task", ["flaw_weights.wrong=1e308", "flaw_weights.truncated=1e308"],
     "flaw_weights: weights must be >= 0 with a positive, finite sum, got {'wrong': 1e+308, 'truncated': 1e+308, "
     "'off_topic': 1.0, 'rambling': 1.0}; they are relative: e.g. 1.0 each"),
    # 9. an empty run_dir (seeds-report refused it already)
    *[(f"{stage}_run_dir_empty", stage, ["run_dir=''"], "run_dir: is empty; pass run_dir=DIR, the run folder")
      for stage in ("task", "sft", "rm", "align", "generate", "label", "mix", "reference", "rm-score", "eval",
                    "report", "serve", "judge", "ppo", "smoke")],
    # 10. batch sizes
    ("label_batch_zero", "label", ["batch_size=0"], "batch_size: must be positive, got 0"),
    ("label_batch_negative", "label", ["batch_size=-1"], "batch_size: must be positive, got -1"),
    ("smoke_batch_zero", "smoke", ["batch_size=0"], "batch_size: must be positive, got 0"),
    # 11. totals past any data set
    ("mix_total", "mix", [f"total={BIG}"],
     f"total: must be <= 1000000000, got {BIG}; set total=null for every record once"),
    ("generate_total_prompts", "generate", [f"total_prompts={BIG}"], f"total_prompts: must be <= 1000000000, got "
                                                                     f"{BIG}; set total_prompts=null for every "
                                                                     "prompt of every source once"),
    ("reference_total", "reference", [f"total={BIG}"],
     f"total: must be <= 1000000000, got {BIG}; set total=null for every record once"),
    ("ppo_total_prompts_big", "ppo", [f"total_prompts={BIG}"], f"total_prompts: must be <= 1000000000, got {BIG}; "
                                                               "set total_prompts=null for every prompt of every "
                                                               "source once"),
    ("sft_total_samples_big", "sft", [f"data.total_samples={BIG}"],
     f"data.total_samples: must be <= 1000000000, got {BIG}; set data.total_samples=null for every record once"),
    # 12. ppo's total_prompts
    ("ppo_total_prompts_zero", "ppo", ["total_prompts=0"],
     "total_prompts: must be >= 1 or null, got 0; set total_prompts=null for every prompt of every source once"),
    ("ppo_total_prompts_negative", "ppo", ["total_prompts=-1"],
     "total_prompts: must be >= 1 or null, got -1; set total_prompts=null for every prompt of every source once"),
    # 13. timeouts and retries
    ("ppo_request_timeout", "ppo", ["services.request_timeout_s=1e12"], "services.request_timeout_s: " + WEEK),
    ("ppo_startup_timeout", "ppo", ["services.startup_timeout_s=1e12"], "services.startup_timeout_s: " + WEEK),
    ("judge_timeout", "judge", ["judge.timeout_s=1e12"], "judge.timeout_s: " + WEEK),
    ("judge_backoff", "judge", ["judge.backoff_s=1e6"],
     "judge.backoff_s: 1e+06s doubled on each of judge.max_retries=6 retries waits 6.3e+07s in all, more than a "
     "week; lower judge.backoff_s or judge.max_retries"),
    ("judge_retries_doubling", "judge", ["judge.max_retries=30"],
     "judge.backoff_s: 2s doubled on each of judge.max_retries=30 retries waits 2.15e+09s in all, more than a "
     "week; lower judge.backoff_s or judge.max_retries"),
    ("judge_retries", "judge", ["judge.max_retries=1000", "judge.backoff_s=0"],
     "judge.max_retries: must be <= 100, got 1000"),
    # 14.-16. processes, resamples, decode slots
    ("ppo_nproc", "ppo", ["services.reward.nproc=100000"],
     "services.reward.nproc: must be <= 1024, got 100000; processes of one service, over all its nodes"),
    ("eval_bootstrap", "eval", [f"bootstrap_samples={BIG}"],
     f"bootstrap_samples: must be <= 1000000, got {BIG}; 1000 (the default) gives stable intervals"),
    ("serve_batch_size", "serve", [f"batch_size={BIG}"],
     f"batch_size: must be <= 4096, got {BIG}; each slot holds a whole sequence's cache"),
    # 18. the smoke run's sizes
    ("smoke_steps_zero", "smoke", ["steps=0"], "steps: must be positive, got 0"),
    ("smoke_steps_negative", "smoke", ["steps=-1"], "steps: must be positive, got -1"),
    ("smoke_seq_len", "smoke", ["seq_len=0"], "seq_len: must be positive, got 0"),
    ("smoke_lr_zero", "smoke", ["lr=0"], "lr: must be positive, got 0.0"),
    ("smoke_lr_negative", "smoke", ["lr=-1e-3"], "lr: must be positive, got -0.001"),
]


@pytest.mark.parametrize("stage,overrides,message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_out_of_range_values_are_refused_in_one_line(stage, overrides, message):
    with pytest.raises(ConfigError) as info:
        compose_stage(stage, _load(STAGES[stage].schema), [*REQUIRED.get(stage, []), *overrides])
    assert str(info.value) == message


def test_cli_cfg_refuses_a_zero_kv_head_count(capsys):
    assert main(["smoke", "model.n_kv_heads=0", "--cfg"]) == 2  # was a ZeroDivisionError traceback
    assert capsys.readouterr().err.strip() == ("orlhf smoke: error: model.n_kv_heads: must be >= 1, got 0; "
                                               "null for as many as model.n_heads")


def test_rm_score_refuses_a_folder_as_output(tmp_path):
    with pytest.raises(ConfigError) as info:  # was IsADirectoryError once every record was scored
        compose_stage("rm-score", _load(STAGES["rm-score"].schema), ["ckpt=c", "input=in.jsonl",
                                                                      f"output={tmp_path}"])
    assert str(info.value) == f"output: {tmp_path} is a folder; pass the JSONL file to write"


def test_task_refuses_a_file_as_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "file"
    run_dir.write_text("")
    assert main(["task", f"run_dir={run_dir}"]) == 2  # was a NotADirectoryError traceback
    assert capsys.readouterr().err.strip() == (
        f"orlhf task: error: run_dir: the stage folder {run_dir / 'task'} is not writable (Not a directory: "
        f"{run_dir / 'task'}); choose a writable run_dir, or fix the folder's permissions")


def test_rope_scaling_needs_a_band():
    with pytest.raises(ConfigError, match=r"^model.rope_scaling.high_freq_factor: must exceed "
                                          r"model.rope_scaling.low_freq_factor=4.0, got 4.0$"):
        RopeScalingConfig(low_freq_factor=4.0, high_freq_factor=4.0)


def test_the_defaults_and_sensible_values_still_compose():
    compose_stage("sft", _load(STAGES["sft"].schema), ["optim.warmup_steps=2", "train.max_steps=3",
                                                       "train.seed=4294967295", "data.total_samples=1000000000"])
    compose_stage("judge", _load(STAGES["judge"].schema), [*REQUIRED["judge"], "judge.max_retries=17"])
    compose_stage("ppo", _load(STAGES["ppo"].schema), ["seed=0", "services.reward.nproc=1024"])
