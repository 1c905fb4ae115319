"""`orlhf generate`: TP=1 replicas split the prompts; a killed run resumes without
losing or repeating a prompt."""

import json
import os
import re
import subprocess
import sys

import pytest

from offline_rlhf.checkpoint import latest_checkpoint, read_meta
from offline_rlhf.cli import main
from offline_rlhf.config.schema import TemplateConfig
from offline_rlhf.data.chat_template import build_template
from offline_rlhf.data.sft_readers import read_sft_source
from offline_rlhf.data.tokenize import encode_prompt
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from offline_rlhf.ledger import read_ledger
from tests.fixtures import REPO_ROOT
from tests.integration.test_sft_stage import sft_args
from tests.local_data import OASST_TREES, SELF_INSTRUCT, prompt_sources
from tests.unit.data.test_chat_template import CHATML

PROMPTS = 41  # odd: the two replicas get uneven shares


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, public_tokenizer):
    run_dir = tmp_path_factory.mktemp("gen_run")
    assert main(sft_args(run_dir, public_tokenizer, "train.max_steps=3", "train.save_every=3")) == 0
    return run_dir


def generate_args(run_dir, out_dir, *extra):
    return ["generate", f"run_dir={out_dir}", f"init.checkpoint={run_dir}/sft/checkpoints",
            prompt_sources("sft", "self_instruct", SELF_INSTRUCT),
            f"total_prompts={PROMPTS}", "generation.max_new_tokens=8", "generation.batch_size=4", "write_every=8",
            *extra]


def samples(out_dir):
    return [json.loads(line) for line in (out_dir / "generate" / "samples.jsonl").read_text().splitlines()]


def run_python(args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def torchrun(args, nproc):
    return run_python(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                       "-m", "offline_rlhf.cli", *args])


def with_kill_hook(args, env=None):
    return run_python(["-c", KILL_AFTER_FIRST_WRITE, *args], env)


KILL_AFTER_FIRST_WRITE = """
import os, signal, sys
import offline_rlhf.stages.generate as stage
from offline_rlhf.checkpoint import latest_checkpoint, read_meta
from offline_rlhf.cli import main

original = stage.append_jsonl_durably
def append_then_maybe_die(path, records):
    original(path, records)
    if os.environ.get("KILL_AFTER_WRITE"):
        with open(path, "a") as handle:
            handle.write('{"schema": 1, "id": 99')  # a torn line, as a crash mid-write leaves
        os.kill(os.getpid(), signal.SIGKILL)
stage.append_jsonl_durably = append_then_maybe_die
sys.exit(main(sys.argv[1:]))
"""


def test_two_replicas_produce_exactly_the_single_process_samples(sft_run, tmp_path):
    assert main(generate_args(sft_run, tmp_path / "one")) == 0
    result = torchrun(generate_args(sft_run, tmp_path / "two"), nproc=2)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    one, two = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert [r["id"] for r in two] == list(range(PROMPTS))
    assert [(r["prompt"], r["response"]) for r in two] == [(r["prompt"], r["response"]) for r in one]
    shards = sorted((tmp_path / "two" / "generate").glob("shard_*.jsonl"))
    per_shard = [{json.loads(line)["id"] for line in path.read_text().splitlines()} for path in shards]
    assert len(per_shard) == 2 and not (per_shard[0] & per_shard[1])
    assert per_shard[0] | per_shard[1] == set(range(PROMPTS))
    [row] = [r for r in read_ledger(tmp_path / "two") if r.stage == "generate"]
    assert row.processes == 2 and row.tokens == sum(r["response_tokens"] for r in two) > 0  # both replicas' tokens


def test_killed_generation_resumes_every_prompt_exactly_once(sft_run, tmp_path):
    out = tmp_path / "killed"
    result = with_kill_hook(generate_args(sft_run, out), env={"KILL_AFTER_WRITE": "1"})
    assert result.returncode == -9, result.stderr.decode()[-3000:]
    assert not (out / "generate" / "DONE").exists()
    result = with_kill_hook(generate_args(sft_run, out))
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert b"cut a torn last line" in result.stdout
    resumed = samples(out)
    assert [r["id"] for r in resumed] == list(range(PROMPTS))
    assert main(generate_args(sft_run, tmp_path / "straight")) == 0
    assert [r["response"] for r in resumed] == [r["response"] for r in samples(tmp_path / "straight")]
    assert [r.status for r in read_ledger(out) if r.stage == "generate"] == ["interrupted", "completed"]
    changed = with_kill_hook(generate_args(sft_run, out, "generation.max_new_tokens=4"))
    assert changed.returncode == 2 and b"generation.max_new_tokens: differs from the run" in changed.stderr


def test_shards_another_version_wrote_are_not_resumed(sft_run, tmp_path, capsys):
    """Answers written before records carried `turns` (schema 2) would mix with this version's."""
    shard = tmp_path / "old" / "generate" / "shard_00000.jsonl"
    shard.parent.mkdir(parents=True)
    shard.write_text(json.dumps({"schema": 2, "id": 0, "sample": 0, "prompt": "p", "response": "r"}) + "\n")
    assert main(generate_args(sft_run, tmp_path / "old")) == 2
    error = capsys.readouterr().err
    assert f"{shard}:1: expected records of schema 3" in error and f"delete {shard.parent}/shard_*.jsonl" in error
    assert not (shard.parent / "samples.jsonl").exists()
    shard.unlink()  # the way to start over
    assert main(generate_args(sft_run, tmp_path / "old")) == 0
    assert {r["schema"] for r in samples(tmp_path / "old")} == {3}


def test_n_sampled_answers_per_prompt_do_not_depend_on_slots_or_replicas(sft_run, tmp_path):
    sampled = ("generation.n=3", "generation.greedy=false", "generation.seed=7")
    assert main(generate_args(sft_run, tmp_path / "one", *sampled)) == 0
    result = torchrun(generate_args(sft_run, tmp_path / "two", *sampled, "generation.batch_size=7"), nproc=2)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    one, two = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert [(r["id"], r["sample"]) for r in one] == [(i, j) for i in range(PROMPTS) for j in range(3)]
    assert [r["response"] for r in two] == [r["response"] for r in one]
    answers_per_prompt = [{r["response"] for r in one[3 * i:3 * i + 3]} for i in range(PROMPTS)]
    assert any(len(answers) > 1 for answers in answers_per_prompt)  # the samples of a prompt differ
    assert {r["finish_reason"] for r in one} <= {"eos", "length"}


def test_one_continuous_batch_per_replica_writes_every_write_every_prompts(sft_run, tmp_path, monkeypatch):
    """The replica's prompts go through one engine run (no batch drained at chunk ends);
    answers are appended as their prompts end, write_every prompts (n records each) a time."""
    import offline_rlhf.stages.generate as stage

    runs, writes = [], []
    engine_run, append = stage.run, stage.append_jsonl_durably
    monkeypatch.setattr(stage, "run", lambda *args, **kwargs: runs.append(len(args[1])) or engine_run(*args, **kwargs))
    monkeypatch.setattr(stage, "append_jsonl_durably",
                        lambda path, records: writes.append(records) or append(path, records))
    assert main(generate_args(sft_run, tmp_path, "generation.n=2", "generation.greedy=false")) == 0
    assert runs == [2 * PROMPTS]
    assert [len(records) for records in writes] == [16] * (PROMPTS // 8) + [2 * (PROMPTS % 8)]
    for records in writes:  # a prompt's answers are written together
        assert [r["id"] for r in records[::2]] == [r["id"] for r in records[1::2]]
    assert [(r["id"], r["sample"]) for r in samples(tmp_path)] == [(i, j) for i in range(PROMPTS) for j in range(2)]


def test_multi_turn_prompts_reach_the_engine_as_chat_sft_rendered_them(tmp_path, monkeypatch):
    """template.kind=chat: an Open Assistant conversation is prompted as its real messages
    (what SFT trained on), not as one user message holding the folded history; its record
    keeps the turns, and one-turn records have none."""
    import offline_rlhf.stages.generate as stage

    folder = tmp_path / "chat_tokenizer"
    tokenizer = train_bpe_tokenizer([SELF_INSTRUCT, OASST_TREES], 512, folder,
                                    special_tokens=("<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"))
    tokenizer.config["chat_template"] = CHATML
    tokenizer.save(folder)
    run_dir, out = tmp_path / "run", tmp_path / "out"
    assert main(sft_args(run_dir, folder, "data.template.kind=chat", "train.max_steps=1", "train.save_every=1")) == 0
    requests, engine_run = [], stage.run
    monkeypatch.setattr(stage, "run", lambda *args, **kwargs: requests.extend(args[1]) or engine_run(*args, **kwargs))
    assert main(["generate", f"run_dir={out}", f"init.checkpoint={run_dir}/sft/checkpoints", prompt_sources(),
                 "generation.max_new_tokens=2", "generation.batch_size=16", "max_prompt_tokens=100000"]) == 0

    tokenizer = Tokenizer.from_dir(folder)
    chat = build_template(TemplateConfig(kind="chat"), tokenizer.config)
    turns_of = {e.prompt: e.turns for e in read_sft_source("oasst", str(OASST_TREES), template=chat)}
    records = samples(out)
    assert len(requests) == len(records) == len(turns_of) and [r["id"] for r in records] == list(range(len(records)))
    budget, multi, cut = read_meta(latest_checkpoint(run_dir / "sft/checkpoints")).model.max_seq_len - 2, 0, 0
    for request, record in zip(requests, records):
        turns = turns_of[record["prompt"]]
        assert [tuple(turn) for turn in record.get("turns", [])] == list(turns)
        # Without its oldest 0, 2, 4... turns: the first that fits is prompted (or the last one's tail).
        recent = [encode_prompt(tokenizer, chat, record["prompt"], turns=turns[k:]) for k in range(0, len(turns), 2)]
        fitting = next((ids for ids in recent if len(ids) <= budget), None) if turns else None
        whole = encode_prompt(tokenizer, chat, record["prompt"], turns=turns)
        prompted = list(request.prompt)  # TokenIds, as a list
        assert prompted == (fitting or (recent or [whole])[-1][-budget:])
        assert record["prompt_truncated"] == (prompted != whole)
        if turns and not record["prompt_truncated"]:
            multi += 1
            assert prompted == whole != encode_prompt(tokenizer, chat, record["prompt"])
        cut += len(turns) > 1 and fitting is not None and fitting != whole
    # Multi-turn prompts checked whole, and some cut by whole exchanges; one-turn ones too.
    assert multi >= 10 and cut >= 1 and any("turns" not in r for r in records)


def test_a_prompts_own_system_turn_is_the_chat_templates_system_message(tmp_path, monkeypatch):
    """A prompt file's `turns` opening with a system turn: prompted with the template's
    system message (not folded into the user turn), its record keeping the turns; one
    without keeps the template's default system message and writes no turns."""
    import offline_rlhf.stages.generate as stage

    folder = tmp_path / "chat_tokenizer"
    tokenizer = train_bpe_tokenizer([SELF_INSTRUCT], 400, folder,
                                    special_tokens=("<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"))
    tokenizer.config["chat_template"] = CHATML
    tokenizer.save(folder)
    run_dir, out = tmp_path / "run", tmp_path / "out"
    assert main(sft_args(run_dir, folder, "data.template.kind=chat", "train.max_steps=1", "train.save_every=1")) == 0
    own = [["system", "Answer in one word."], ["user", "Name a colour."]]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", {"prompt": "Answer in one word.\n\nName a colour.", "turns": own},
                          {"prompt": "Name a fruit."})
    requests, engine_run = [], stage.run
    monkeypatch.setattr(stage, "run", lambda *args, **kwargs: requests.extend(args[1]) or engine_run(*args, **kwargs))
    assert main(["generate", f"run_dir={out}", f"init.checkpoint={run_dir}/sft/checkpoints",
                 prompt_sources("prompts", "jsonl", prompts), "generation.max_new_tokens=2"]) == 0
    records = samples(out)
    assert [r.get("turns") for r in records] == [own, None]
    texts = [Tokenizer.from_dir(folder).decode(list(request.prompt), skip_special_tokens=False) for request in requests]
    assert texts == ["<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
                     "<|im_start|>assistant\n",
                     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nName a fruit."
                     "<|im_end|>\n<|im_start|>assistant\n"]


def write_jsonl(path, *records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_a_resume_after_the_prompt_file_changed_is_refused_before_generating(sft_run, tmp_path, capsys):
    """Prompt ids are positions in the mix of the sources' content: shards written for
    another content would answer prompts no longer asked and leave others unanswered."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", *({"prompt": f"Name {i} fruits."} for i in range(12)))
    out = tmp_path / "out"
    args = ["generate", f"run_dir={out}", f"init.checkpoint={sft_run}/sft/checkpoints",
            prompt_sources("prompts", "jsonl", prompts), "generation.max_new_tokens=4", "write_every=4"]
    assert main(args) == 0
    (out / "generate" / "DONE").unlink()  # as after a crash before the merge: shards to resume
    (out / "generate" / "samples.jsonl").unlink()
    shards = {path: path.read_bytes() for path in (out / "generate").glob("shard_*.jsonl")}
    prompts.write_text("".join(prompts.read_text().splitlines(keepends=True)[3:]))  # the first lines deleted
    capsys.readouterr()
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and (
        f"sources: the prompt inputs changed since the shards in {out / 'generate'} were written: " in error)
    assert f"restore them, or delete {out / 'generate'}/shard_*.jsonl and rerun the stage" in error
    assert {path: path.read_bytes() for path in shards} == shards  # nothing generated, nothing merged
    assert not (out / "generate" / "samples.jsonl").exists()
    for path in shards:  # the way to start over
        path.unlink()
    assert main(args) == 0
    assert sorted(r["prompt"] for r in samples(out)) == sorted(f"Name {i} fruits." for i in range(3, 12))


def test_records_only_training_cannot_use_give_their_prompts_and_blank_prompts_are_counted(sft_run, tmp_path,
                                                                                          capsys):
    """An SFT example with a blank response and a pair with identical sides still ask a
    prompt; a blank prompt is skipped and counted (strict=true: an error naming file:line).
    Cut prompts are counted once each, whatever generation.n."""
    sft = write_jsonl(tmp_path / "sft_blank.jsonl",
                      {"prompt": "Write a long poem about the sea.", "response": "Waves."},
                      {"prompt": "Describe the color of the sky at dusk.", "response": " "})
    pairs = write_jsonl(tmp_path / "pairs.jsonl", {"prompt": "Explain why the grass is green.",
                                                   "chosen": "Chlorophyll.", "rejected": "Chlorophyll."})
    asked = write_jsonl(tmp_path / "prompts.jsonl", {"prompt": "Tell me a story about a cat."}, {"prompt": ""})
    sources = (f"sources=[{{name: sft, kind: sft, path: '{sft}'}}, {{name: pref, kind: preference, path: '{pairs}'}}, "
               f"{{name: mine, kind: prompts, path: '{asked}'}}]")
    args = ["generate", f"run_dir={tmp_path / 'out'}", f"init.checkpoint={sft_run}/sft/checkpoints", sources,
            "generation.max_new_tokens=4", "generation.n=2", "generation.greedy=false", "max_prompt_tokens=3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    records = samples(tmp_path / "out")
    assert len(records) == 8 and {r["prompt"] for r in records} == {
        "Write a long poem about the sea.", "Describe the color of the sky at dusk.", "Explain why the grass is green.",
        "Tell me a story about a cat."}
    card = json.loads((tmp_path / "out" / "generate" / "generation_card.json").read_text())
    assert card["skipped"] == {"blank 'prompt'": 1} and card["sources"]["mine"]["skipped"] == {"blank 'prompt'": 1}
    assert card["prompt_truncated"] == 4  # every prompt cut to 3 tokens: 4 prompts, 8 answers
    assert "4 of 4 prompts were cut to 3 tokens; unusable prompt records: 1 skipped (1 blank 'prompt')" in out
    assert re.search(r"; \d+ new tokens in [\d.]+ s \(\d+ tokens/s over 1 replica\(s\)\);", out), out
    assert main([*args, f"run_dir={tmp_path / 'more'}", "total_prompts=6"]) == 0
    assert "generate: 6 prompts (2 of them repeats to reach total_prompts; unusable records: 1 skipped" in \
        capsys.readouterr().out
    assert main([*args, f"run_dir={tmp_path / 'strict'}", "strict=true"]) == 2
    assert f"{asked}:2: expected 'prompt' to be non-empty text (blank)" in capsys.readouterr().err
