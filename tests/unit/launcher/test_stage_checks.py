"""`orlhf launch` validates each stage for the processes it will get and checks its inputs
(hardening issue, item 12): what used to pass a dry run and fail in the queue."""

from __future__ import annotations

import json

import pytest

from launcher.compose import compose_launch
from launcher.plan import plan_pipeline
from launcher.schema import LaunchError, StageEntry
from offline_rlhf.cli import main as orlhf


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "data" / "sft.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    return {"data": data, "tokenizer": tokenizer, "run_dir": tmp_path / "run"}


def sft(files, *extra, nproc=1, name=None, data=None, tokenizer=True):
    overrides = ["model=tiny", f"data.sources=[{{name: d, format: jsonl, path: '{data or files['data']}'}}]",
                 "train.global_batch=8", "train.micro_batch=1"]
    if tokenizer:
        overrides.append(f"init.tokenizer={files['tokenizer'] if tokenizer is True else tokenizer}")
    return StageEntry(stage="sft", name=name, overrides=[*overrides, *extra], nproc=nproc)


def plan(files, *entries):
    cfg = compose_launch(["pipeline=smoke", "cluster=local", f"run_dir={files['run_dir']}"])
    cfg.pipeline.stages = list(entries)
    return plan_pipeline(cfg)


def fails(files, *entries) -> str:
    with pytest.raises(LaunchError) as info:
        plan(files, *entries)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_valid_stage_still_plans(files):
    (only,) = plan(files, sft(files, nproc=2))
    assert only.world_size == 2


def test_8b_sft_without_checkpoint_or_tokenizer_is_refused(files):
    message = fails(files, sft(files, "model=8b", tokenizer=False))
    assert message.startswith("pipeline.stages[0] (sft, nproc=1): orlhf sft: error: init.tokenizer: is required")


def test_global_batch_must_split_over_the_stages_processes(files):
    assert plan(files, sft(files, "train.global_batch=6", nproc=3))  # 6 = 2 x 3 data-parallel ranks
    message = fails(files, sft(files, "train.global_batch=6", nproc=4))
    assert message.startswith("pipeline.stages[0] (sft, nproc=4): orlhf sft: error: train.global_batch: 6 is not "
                              "divisible by train.micro_batch=1 x data-parallel size 4")


def test_tensor_parallelism_must_divide_the_heads(files):
    message = fails(files, sft(files, "parallel.tp=8", nproc=8))
    assert message.startswith("pipeline.stages[0] (sft, nproc=8): orlhf sft: error: parallel.tp: 8 does not divide "
                              "model.n_heads=4")


def test_a_missing_data_file_names_the_stage_key_and_path(files):
    missing = files["data"].parent / "nope.jsonl"
    message = fails(files, StageEntry(stage="task"), sft(files, data=missing))
    assert message == (f"pipeline.stages[1] (sft) data.sources[0].path: {missing} does not exist and no earlier "
                       "stage of the pipeline writes it; fix the path, or run the stage that writes it first")


def test_inputs_an_earlier_stage_writes_are_accepted(files):
    """The task stage writes run_dir/task/{sft.jsonl,tokenizer}: the SFT after it may read them."""
    produced = {"data": "${run_dir}/task/sft.jsonl", "tokenizer": "${run_dir}/task/tokenizer"}
    entry = sft(files, data=produced["data"], tokenizer=produced["tokenizer"])
    plans = plan(files, StageEntry(stage="task"), entry)
    assert [p.name for p in plans] == ["task", "sft"]
    message = fails(files, entry)  # without the task stage nobody writes them
    assert message.startswith("pipeline.stages[0] (sft) data.sources[0].path: ")
    message = fails(files, entry, StageEntry(stage="task"))  # nor when it runs after
    assert "stage 'task' writes it, but runs later" in message


def test_checkpoints_of_earlier_stages_are_accepted(files):
    """rm starts from run_dir/sft/checkpoints by default: fine after an sft stage, not alone."""
    rm = StageEntry(stage="rm", overrides=[f"data.sources=[{{name: d, format: jsonl, path: '{files['data']}'}}]",
                                           "train.global_batch=8"])
    assert [p.name for p in plan(files, sft(files), rm)] == ["sft", "rm"]
    assert fails(files, rm).startswith("pipeline.stages[0] (rm) init.checkpoint: ")


def test_check_flag_prints_inputs_for_the_given_world_size(files, capsys, monkeypatch):
    monkeypatch.setenv("ORLHF_CHECK_WORLD_SIZE", "2")
    args = ["sft", "model=tiny", f"init.tokenizer={files['tokenizer']}",
            f"data.sources=[{{name: d, format: jsonl, path: '{files['data']}'}}]", "train.global_batch=4", "--check"]
    assert orlhf(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["world_size"] == 2
    assert {"key": "data.sources[0].path", "path": str(files["data"]), "exists": True, "head": None} \
        in report["inputs"]
    monkeypatch.setenv("ORLHF_CHECK_WORLD_SIZE", "3")
    assert orlhf(args) == 2
    assert "train.global_batch: 4 is not divisible" in capsys.readouterr().err


def test_a_rerun_after_a_crash_before_the_first_checkpoint_still_plans(files):
    """sft/checkpoints exists but holds no complete step yet: rm's architecture and tokenizer
    come later, so the rerun that resumes the pipeline is not refused."""
    (files["run_dir"] / "sft" / "checkpoints" / "step_00000010.partial").mkdir(parents=True)
    rm = StageEntry(stage="rm", overrides=[f"data.sources=[{{name: d, format: jsonl, path: '{files['data']}'}}]",
                                           "train.global_batch=8"])
    assert [p.name for p in plan(files, sft(files), rm)] == ["sft", "rm"]


def test_an_existing_init_checkpoint_fixes_the_model_checked(files, tmp_path):
    """`model=8b` (32 KV heads) is unused: the checkpoint's TINY model has 2 KV heads, which TP=4 cannot split."""
    from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
    from tests.fixtures import TINY, reference_model

    ckpt = tmp_path / "base"
    save_checkpoint(ckpt, reference_model(), CheckpointMeta(model=TINY, head="lm", train_state=TrainState(1)),
                    tokenizer_dir=files["tokenizer"])
    entry = sft(files, "model=8b", f"init.checkpoint={ckpt}", "parallel.tp=4", nproc=4, tokenizer=False)
    assert "does not divide model.n_kv_heads=2" in fails(files, entry)


def test_check_resolves_and_reads_an_init_checkpoint_once(files, tmp_path, capsys, monkeypatch):
    """Its head and its model come from one reading (a root's `latest`, then its metadata);
    the tokenizer named apart, nothing else resolves it."""
    from offline_rlhf import checkpoint_meta
    from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
    from tests.fixtures import TINY, reference_model

    ckpt = tmp_path / "base"
    save_checkpoint(ckpt, reference_model(), CheckpointMeta(model=TINY, head="lm", train_state=TrainState(1)),
                    tokenizer_dir=files["tokenizer"])
    resolved = []
    resolve = checkpoint_meta.resolve_checkpoint
    monkeypatch.setattr(checkpoint_meta, "resolve_checkpoint", lambda *args: resolved.append(args) or resolve(*args))
    args = ["sft", "model=8b", f"init.checkpoint={ckpt}", f"init.tokenizer={files['tokenizer']}",
            "data.max_seq_len=64", "train.global_batch=4",
            f"data.sources=[{{name: d, format: jsonl, path: '{files['data']}'}}]", "--check"]
    assert orlhf(args) == 0
    assert {"key": "init.checkpoint", "path": str(ckpt), "exists": True, "head": "lm"} \
        in json.loads(capsys.readouterr().out)["inputs"]
    assert resolved == [(str(ckpt), "init.checkpoint")]


def test_the_paper_pipeline_asks_for_its_imported_base_model_first(tmp_path):
    cfg = compose_launch(["pipeline=offline_dt", "cluster=slurm", f"run_dir={tmp_path}"])
    with pytest.raises(LaunchError) as info:
        plan_pipeline(cfg)
    assert str(info.value).startswith("pipeline.stages[0] (sft) init.checkpoint: ")
    assert f"{tmp_path}/base does not exist and no earlier stage of the pipeline writes it" in str(info.value)


def test_a_hub_model_is_not_a_missing_input(files):
    """A repo id in init.checkpoint is resolved by the stage (hub or cache), not a path."""
    rm = StageEntry(stage="rm", overrides=[f"data.sources=[{{name: d, format: jsonl, path: '{files['data']}'}}]",
                                           "train.global_batch=8", "init.checkpoint=meta-llama/Llama-3.2-1B@main"])
    assert [p.name for p in plan(files, rm)] == ["rm"]
    missing = StageEntry(stage="rm", overrides=[*rm.overrides[:2], f"init.checkpoint={files['run_dir']}/nope"])
    assert "init.checkpoint" in fails(files, missing)


def test_a_ppo_actor_world_that_cannot_split_its_minibatch_is_refused_before_queueing(files):
    ppo = StageEntry(stage="ppo", overrides=[f"init.tokenizer={files['tokenizer']}",
                                             "ppo.minibatch=16", "ppo.micro_batch=4"], nproc=3)
    message = fails(files, ppo)
    assert "ppo.micro_batch" in message and "3 data-parallel ranks" in message, message


def saved_tiny(files, tmp_path, head="lm"):
    from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
    from tests.fixtures import TINY, reference_model

    ckpt = tmp_path / "base"
    save_checkpoint(ckpt, reference_model(head=head), CheckpointMeta(model=TINY, head=head, train_state=TrainState(1)),
                    tokenizer_dir=files["tokenizer"])
    return ckpt, TINY


def test_rows_or_answers_longer_than_the_checkpoints_model_are_refused_before_queueing(files, tmp_path):
    """The stage refused them seconds after its job started; the launch passed them."""
    ckpt, model = saved_tiny(files, tmp_path)
    entry = sft(files, f"init.checkpoint={ckpt}", f"data.max_seq_len={model.max_seq_len + 1}", tokenizer=False)
    assert fails(files, entry).endswith(f"data.max_seq_len: {model.max_seq_len + 1} exceeds "
                                        f"max_seq_len={model.max_seq_len} of the init.checkpoint's model; set "
                                        f"data.max_seq_len<={model.max_seq_len}")
    generate = StageEntry(stage="generate", overrides=[
        f"init.checkpoint={ckpt}", f"generation.max_new_tokens={model.max_seq_len}",
        f"sources=[{{name: p, kind: prompts, path: '{files['data']}'}}]"])
    assert fails(files, generate).endswith(f"generation.max_new_tokens: {model.max_seq_len} leaves no room for a "
                                           f"prompt in the model's max_seq_len={model.max_seq_len}; lower it")


def test_a_checkpoint_path_naming_a_file_is_refused_not_taken_for_one_not_written_yet(files):
    entry = sft(files, f"init.checkpoint={files['data']}", tokenizer=False)
    assert fails(files, entry).endswith(f"init.checkpoint: {files['data']} is a file, not a checkpoint folder; pass "
                                        "a checkpoint folder (a stage's checkpoints/ or one of its step_* folders)")


def test_a_checkpoint_of_the_wrong_head_is_refused_before_queueing(files, tmp_path):
    """A reward model where a language model generates: the stage refused it once its job ran
    (and `--check` said the answers did not fit the reward model's context)."""
    ckpt, _ = saved_tiny(files, tmp_path, head="value")
    generate = StageEntry(stage="generate", overrides=[
        f"init.checkpoint={ckpt}", f"sources=[{{name: p, kind: prompts, path: '{files['data']}'}}]"])
    assert fails(files, generate).endswith(f"init.checkpoint: {ckpt}/step_00000001 holds a 'value' head, not a "
                                           "language model's 'lm' head; pass an SFT, aligned or imported "
                                           "language-model checkpoint")


def test_a_checkpoint_an_earlier_stage_will_write_must_be_of_the_head_read(files):
    """eval's reward model pointed at the SFT's checkpoints (written later, so `--check`
    cannot read them): refused before any stage runs, not after the SFT has trained."""
    sft_checkpoints = files["run_dir"] / "sft" / "checkpoints"

    def evaluation(rm: str) -> StageEntry:
        return StageEntry(stage="eval", overrides=[
            f"prompts={files['data']}", f"models=[{{name: sft, checkpoint: '{sft_checkpoints}'}}]", f"rm={rm}"])

    message = fails(files, sft(files), evaluation(str(sft_checkpoints)))
    assert message == (f"pipeline.stages[1] (eval) rm: {sft_checkpoints} is written by stage 'sft', which saves a "
                       "language model (lm head); this needs a reward model (value head); point it at a stage that "
                       "saves one (sft or align: a language model; rm: a reward model)")
    rm = StageEntry(stage="rm", overrides=[f"data.sources=[{{name: d, format: jsonl, path: '{files['data']}'}}]",
                                           "train.global_batch=8"])
    assert [p.name for p in plan(files, sft(files), rm, evaluation(f"{files['run_dir']}/rm/checkpoints"))] == \
        ["sft", "rm", "eval"]


def test_the_launcher_names_heads_as_the_stages_do():
    """launcher.plan repeats the stages' table (it imports no offline_rlhf): one wording."""
    from launcher.plan import HEAD_NAMES
    from offline_rlhf.train import init

    assert HEAD_NAMES == init.HEAD_NAMES


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_before_queueing(files, tmp_path):
    """The stage refused it once its job ran; a tokenizer an earlier stage writes is checked by the stage."""
    from offline_rlhf.data.tokenizer import train_bpe_tokenizer
    from tests.unit.data.test_tokenizer import SHAKESPEARE

    large = tmp_path / "large_tokenizer"
    train_bpe_tokenizer([SHAKESPEARE], 1024, large)
    assert fails(files, sft(files, tokenizer=large)).endswith(
        "model.vocab_size: 512 is smaller than the tokenizer's 1024 tokens "
        f"({large}); set model.vocab_size >= 1024")
    assert plan(files, sft(files, "model.vocab_size=1024", tokenizer=large))


def test_checks_read_checkpoints_and_tokenizers_without_loading_torch(files, tmp_path):
    """`orlhf launch` runs `--check` for every stage before queueing: without torch each
    takes a fraction of a second instead of seconds (importing torch) on a login node."""
    import subprocess
    import sys

    from offline_rlhf.data.tokenizer import train_bpe_tokenizer
    from tests.unit.data.test_tokenizer import SHAKESPEARE

    tokenizer = tmp_path / "bpe"
    train_bpe_tokenizer([SHAKESPEARE], 300, tokenizer)
    lm, _ = saved_tiny(files, tmp_path)
    data = f"data.sources=[{{name: d, format: jsonl, path: '{files['data']}'}}]"
    checks = [["sft", "model=tiny", "model.vocab_size=300", f"init.tokenizer={tokenizer}", data],
              ["generate", f"init.checkpoint={lm}", "generation.max_new_tokens=16",
               f"sources=[{{name: p, kind: prompts, path: '{files['data']}'}}]"],
              ["label", f"rm={lm}", f"inputs=[{{name: p, path: '{files['data']}'}}]"]]
    script = ("import json, sys\nfrom offline_rlhf.cli import main\n"
              "codes = [main([*args, f'run_dir={sys.argv[2]}', '--check']) for args in json.loads(sys.argv[1])]\n"
              "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(checks), str(files["run_dir"])],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.splitlines()[-1])
    assert outcome == {"codes": [0, 0, 2], "torch": False}, done.stderr
    assert "holds a 'lm' head, not a reward model's 'value' head" in done.stderr  # the rm's head was read
