"""`orlhf reference` end to end: the pairs (RM-ranked and human) with the reference log-probs
of an LM checkpoint, equal to that model's log-probs in-process; a killed pass resumes
without duplicates; two replicas equal one process; `orlhf align method=dpo|ipo|cdpo`
trains on them, starting at loss log 2 (the policy is its reference); both render with the
template the SFT checkpoint records; a resumed pass refuses log-probs of another input."""

import json
import math
import re
import shutil

import pytest
import torch

from offline_rlhf.checkpoint import (
    TEMPLATE,
    CheckpointMeta,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from offline_rlhf.cli import main
from offline_rlhf.config.schema import ModelConfig, ParallelConfig
from offline_rlhf.data.chat_template import build_template
from offline_rlhf.data.embedded_task import canonical_response, gold_reward
from offline_rlhf.data.packing import unpacked
from offline_rlhf.data.pair_dataset import PairExample, encode_pair_example, tokens_digest
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.labeling.pairs import sequence_logps
from offline_rlhf.ledger import read_ledger
from offline_rlhf.metrics import read_metrics
from offline_rlhf.models.llama import Transformer
from offline_rlhf.parallel.dims import ParallelDims
from tests.fixtures import runtime_for
from tests.integration.test_generate_stage import run_python, torchrun
from tests.unit.data.test_chat_template import CHATML

PROMPTS = 11  # RM-ranked pairs: one per prompt; plus one single-sample prompt and HUMAN human pairs
HUMAN = 5
CHAT = {"kind": "chat", "system": ""}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A small embedded task, a random LM checkpoint standing in for SFT, and a labeled file."""
    run_dir = tmp_path_factory.mktemp("reference_run")
    assert main(["task", f"run_dir={run_dir}", "n_sft=40", "n_preferences=20", "n_gen_prompts=20",
                 "n_eval_prompts=10"]) == 0
    tokenizer = Tokenizer.from_dir(run_dir / "task" / "tokenizer")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                         max_seq_len=128)
    torch.manual_seed(0)
    model = Transformer(config, head="lm")
    model.init_weights()
    save_checkpoint(run_dir / "sft" / "checkpoints", model,
                    CheckpointMeta(model=config, head="lm", train_state=TrainState()),
                    tokenizer_dir=run_dir / "task" / "tokenizer")
    write_labeled(run_dir)
    return run_dir


def write_labeled(run_dir):
    """`orlhf label`-shaped records scored by the gold reward: per prompt the right answer
    (3), it with a filler word (2.75) and it cut short (0, unfinished); human pairs."""
    lines = (run_dir / "task" / "gen_prompts.jsonl").read_text().splitlines()
    prompts = list(dict.fromkeys(json.loads(line)["prompt"] for line in lines))[:PROMPTS + 1]
    rows = []
    for prompt in prompts[:PROMPTS]:
        right = canonical_response(prompt)
        answers = [(right, True), ("um " + right, True), (right.split()[0], False)]
        rows += [{"prompt": prompt, "response": text, "kind": "generated", "source": "generated",
                  "reward": gold_reward(prompt, text), **({} if done else {"finished": False})}
                 for text, done in answers]
    rows.append({"prompt": prompts[PROMPTS], "response": "x.", "kind": "generated", "source": "generated",
                 "reward": 0.0})
    for pair, line in enumerate((run_dir / "task" / "preferences.jsonl").read_text().splitlines()[:HUMAN]):
        record = json.loads(line)
        rows += [{"prompt": record["prompt"], "response": record[side], "kind": side, "source": "human_prefs",
                  "pair": pair, "reward": 0.0} for side in ("chosen", "rejected")]
    (run_dir / "labeled.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def reference_args(run_dir, out, *extra):
    return ["reference", f"run_dir={out}", f"init.checkpoint={run_dir}/sft/checkpoints",
            f"input={run_dir}/labeled.jsonl", "max_seq_len=64", "batch_size=3", "write_every=4", *extra]


def pairs_of(out):
    return [json.loads(line) for line in (out / "reference" / "pairs.jsonl").read_text().splitlines()]


def example(pair):
    return PairExample(pair["prompt"], pair["chosen"], pair["rejected"], pair.get("chosen_finished", True),
                       pair.get("rejected_finished", True))


def one_error_line(capsys) -> str:
    [line] = capsys.readouterr().err.strip().splitlines()
    return line


def test_stored_reference_log_probs_equal_the_models_in_process(lm_run, tmp_path):
    assert main(reference_args(lm_run, tmp_path)) == 0
    pairs = pairs_of(tmp_path)
    assert [p["id"] for p in pairs] == list(range(PROMPTS + HUMAN))
    assert sorted(p["origin"] for p in pairs) == ["human"] * HUMAN + ["rm_ranked"] * PROMPTS
    card = json.loads((tmp_path / "reference" / "dataset_card.json").read_text())
    assert card["rm_ranked"] == {"prompts": PROMPTS + 1, "pairs": PROMPTS, "single_sample": 1, "tie": 0,
                                 "below_gap": 0}
    assert card["human"] == {"pairs": HUMAN, "incomplete": 0} and card["pairs"] == PROMPTS + HUMAN
    assert "11 RM-ranked from 12 prompts: 1 with one sample" in (tmp_path / "reference" / "dataset_card.md").read_text()
    # Best vs worst: the right answer against the one cut short, which is encoded without EOS.
    ranked = [p for p in pairs if p["origin"] == "rm_ranked"]
    assert all(p["chosen_reward"] == 3.0 and p["rejected_reward"] == 0.0 for p in ranked)
    assert all(p["rejected_finished"] is False and "chosen_finished" not in p for p in ranked)

    path = latest_checkpoint(lm_run / "sft" / "checkpoints")
    model = Transformer(read_meta(path).model, head="lm")
    load_checkpoint(path, model)
    tokenizer = Tokenizer.from_dir(path / "tokenizer")
    encoded = [encode_pair_example(tokenizer, ChatTemplate(), example(p), 64) for p in pairs]
    single = runtime_for(ParallelDims.build(ParallelConfig(), 1, model.cfg), None)
    expected = sequence_logps(model.eval(), unpacked([s for pair in encoded for s in pair]), 32, single,
                              tokenizer.pad_id)
    stored = [value for p in pairs for value in (p["ref_chosen_logp"], p["ref_rejected_logp"])]
    assert stored == pytest.approx(expected, abs=1e-5)
    assert all(value < 0 for value in stored)
    [row] = [r for r in read_ledger(tmp_path) if r.stage == "reference"]
    assert row.status == "completed" and row.tokens == sum(len(s) for pair in encoded for s in pair)


KILL_AFTER_FIRST_WRITE = """
import os, signal, sys
import offline_rlhf.stages.reference as stage
from offline_rlhf.cli import main

original = stage.append_jsonl_durably
def append_then_die(path, records):
    original(path, records)
    with open(path, "a") as handle:
        handle.write('{"id": 99, "ref_chosen')  # a torn line, as a crash mid-write leaves
    os.kill(os.getpid(), signal.SIGKILL)
stage.append_jsonl_durably = append_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_killed_pass_resumes_without_duplicates(lm_run, tmp_path):
    out = tmp_path / "killed"
    result = run_python(["-c", KILL_AFTER_FIRST_WRITE, *reference_args(lm_run, out)])
    assert result.returncode == -9, result.stderr.decode()[-3000:]
    shard = out / "reference" / "shard_00000.jsonl"
    assert len(shard.read_text().splitlines()) == 5 and not (out / "reference" / "DONE").exists()  # 4 + torn
    result = run_python(["-m", "offline_rlhf.cli", *reference_args(lm_run, out)])
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert b"cut a torn last line" in result.stdout and b"4 already scored" in result.stdout
    ids = [json.loads(line)["id"] for line in shard.read_text().splitlines()]
    assert sorted(ids) == list(range(PROMPTS + HUMAN))  # each pair scored exactly once
    assert main(reference_args(lm_run, tmp_path / "straight")) == 0
    assert pairs_of(out) == pairs_of(tmp_path / "straight")
    assert [r.status for r in read_ledger(out) if r.stage == "reference"] == ["interrupted", "completed"]
    changed = run_python(["-m", "offline_rlhf.cli", *reference_args(lm_run, out, "min_gap=3.5")])
    assert changed.returncode == 2 and b"min_gap: differs from the run" in changed.stderr


def test_a_resumed_pass_refuses_pairs_scored_from_an_earlier_input(lm_run, tmp_path, capsys):
    """The input rewritten at the same path (a rerun `orlhf label`) after a crash before the
    merge: the shards hold log-probs of other sequences, so the run stops with the fix."""
    labeled, out = tmp_path / "labeled.jsonl", tmp_path / "run"
    labeled.write_text((lm_run / "labeled.jsonl").read_text())
    args = reference_args(lm_run, out, f"input={labeled}")
    assert main(args) == 0
    stage, pairs = out / "reference", pairs_of(out)
    shard = sorted((json.loads(line) for line in (stage / "shard_00000.jsonl").read_text().splitlines()),
                   key=lambda record: record["id"])
    assert [r["tokens_sha1"] for r in shard] == [p["tokens_sha1"] for p in pairs]
    (stage / "DONE").unlink()
    (stage / "pairs.jsonl").unlink()
    rows = [json.loads(line) for line in labeled.read_text().splitlines()]
    [changed] = [i for i, p in enumerate(pairs) if p["chosen"] == rows[0]["response"]]
    rows[0]["response"] += " Indeed."
    labeled.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(args) == 2
    assert one_error_line(capsys) == (
        f"orlhf reference: error: input: 1 of the pairs scored in {stage} tokenize otherwise now (first: id "
        f"{changed}): {labeled}, the tokenizer or init.checkpoint's template changed since; restore what they were "
        f"scored from, or delete {stage}/shard_*.jsonl and rerun the stage to do every item again")
    for path in stage.glob("shard_*.jsonl"):  # the fix the message gives
        path.unlink()
    assert main(args) == 0
    assert pairs_of(out)[changed]["chosen"] == rows[0]["response"]


@pytest.fixture(scope="module")
def chat_sft(lm_run):
    """lm_run's SFT weights, recorded as trained with a ChatML template its tokenizer carries."""
    folder = lm_run / "chat_tokenizer"
    tokenizer = Tokenizer.from_dir(lm_run / "task" / "tokenizer")
    tokenizer.config["chat_template"] = CHATML
    tokenizer.save(folder)
    path = latest_checkpoint(lm_run / "sft" / "checkpoints")
    model = Transformer(read_meta(path).model, head="lm")
    load_checkpoint(path, model)
    save_checkpoint(lm_run / "chat_sft", model, CheckpointMeta(model=model.cfg, head="lm", train_state=TrainState(),
                                                               metadata={TEMPLATE: CHAT}), tokenizer_dir=folder)
    return resolve_checkpoint(lm_run / "chat_sft")


def test_reference_and_align_render_as_the_sft_checkpoint_was_trained(lm_run, chat_sft, tmp_path, capsys):
    """Under a default config, pairs and DT samples are encoded with the chat template the
    SFT checkpoint records, and the aligned checkpoints record it again; a config that asks
    for another template is one line naming the key to set and the recorded value."""
    assert main(reference_args(lm_run, tmp_path, f"init.checkpoint={chat_sft}")) == 0
    assert json.loads((tmp_path / "reference" / "dataset_card.json").read_text())["template"] == CHAT
    tokenizer = Tokenizer.from_dir(chat_sft / "tokenizer")
    template = build_template(CHAT, tokenizer.config)
    pairs = pairs_of(tmp_path)
    assert [p["tokens_sha1"] for p in pairs] == \
        [tokens_digest(*encode_pair_example(tokenizer, template, example(p), 64)) for p in pairs]
    for method, extra in (("dpo", ()), ("dt", (f"data.path={lm_run}/labeled.jsonl",))):
        assert main(align_args(tmp_path, method, f"init.checkpoint={chat_sft}", *extra)) == 0
        assert read_meta(latest_checkpoint(tmp_path / f"align_{method}" / "checkpoints")).metadata[TEMPLATE] == CHAT
    capsys.readouterr()
    assert main(reference_args(lm_run, tmp_path / "paper", f"init.checkpoint={chat_sft}", "template.user_tag=Q:")) == 2
    assert one_error_line(capsys) == (
        f"orlhf reference: error: template.kind: is 'paper', but {chat_sft} was trained with kind='chat' (its "
        f"metadata.template: {CHAT}); set template.kind=chat, or leave template at its default to use the "
        "checkpoint's")
    assert main(align_args(tmp_path / "system", "dpo", f"init.checkpoint={chat_sft}", "data.template.kind=chat",
                           "data.template.system=Be brief.", f"data.pairs={tmp_path}/reference/pairs.jsonl")) == 2
    assert one_error_line(capsys).startswith(
        f"orlhf align: error: data.template.system: is 'Be brief.', but {chat_sft} was trained with system=''")


def test_two_replicas_equal_one_process(lm_run, tmp_path):
    assert main(reference_args(lm_run, tmp_path / "one")) == 0
    result = torchrun(reference_args(lm_run, tmp_path / "two"), nproc=2)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    one, two = pairs_of(tmp_path / "one"), pairs_of(tmp_path / "two")
    drop = ("ref_chosen_logp", "ref_rejected_logp")
    assert [{k: v for k, v in p.items() if k not in drop} for p in two] == \
        [{k: v for k, v in p.items() if k not in drop} for p in one]
    assert [p["ref_chosen_logp"] for p in two] == pytest.approx([p["ref_chosen_logp"] for p in one], abs=1e-5)
    shards = sorted((tmp_path / "two" / "reference").glob("shard_*.jsonl"))
    assert len(shards) == 2 and all(path.read_text() for path in shards)
    # Rank 0's ledger row counts both replicas' tokens (it counted its own only).
    assert [r.tokens for r in read_ledger(tmp_path / "two") if r.stage == "reference"] == \
        [r.tokens for r in read_ledger(tmp_path / "one") if r.stage == "reference"]


def align_args(run_dir, method, *extra):
    return ["align", f"run_dir={run_dir}", f"method={method}", "data.max_seq_len=64", "train.global_batch=4",
            "train.micro_batch=2", "train.max_steps=2", "data.val_fraction=0.2", "optim.lr=1e-3",
            "logging.progress=false", *extra]


@pytest.fixture(scope="module")
def referenced_run(lm_run):
    assert main(reference_args(lm_run, lm_run)) == 0
    return lm_run


@pytest.mark.parametrize("method", ["dpo", "ipo", "cdpo"])
def test_align_trains_on_the_pairs_from_loss_log_2(referenced_run, method):
    assert main(align_args(referenced_run, method)) == 0
    stage = referenced_run / f"align_{method}"
    rows = [row for row in read_metrics(stage) if "train/loss" in row]
    assert len(rows) == 2
    first = rows[0]
    start = math.log(2) if method != "ipo" else (1 / (2 * 0.1)) ** 2  # h = 0: the policy is its reference
    assert first["train/loss"] == pytest.approx(start, abs=1e-4)
    assert first["train/reward_margin"] == pytest.approx(0.0, abs=1e-4) and first["train/reward_accuracy"] == 0.0
    assert rows[1]["train/reward_margin"] != 0.0  # the first step moved the policy
    val = [row for row in read_metrics(stage) if "val/loss" in row]
    assert val and "val/reward_accuracy" in val[-1]
    meta = read_meta(latest_checkpoint(stage / "checkpoints"))
    assert meta.metadata["alignment"]["method"] == method
    assert meta.metadata["alignment"]["dataset"]["pairs"] == PROMPTS + HUMAN


def test_align_refuses_pairs_tokenized_otherwise_and_a_missing_reference_stage(referenced_run, tmp_path, capsys):
    pairs = f"{referenced_run}/reference/pairs.jsonl"
    assert main(align_args(tmp_path / "short", "dpo", "data.max_seq_len=16", f"data.pairs={pairs}",
                           f"init.checkpoint={referenced_run}/sft/checkpoints")) == 2
    assert re.search(rf"{pairs}:\d+: expected the pair to tokenize as in the reference pass; data.max_seq_len",
                     capsys.readouterr().err)
    assert main(align_args(tmp_path, "dpo", f"init.checkpoint={referenced_run}/sft/checkpoints")) == 2
    err = capsys.readouterr().err
    assert "data.pairs" in err and "run `orlhf reference` first" in err and len(err.strip().splitlines()) == 1


def test_log_probs_of_an_earlier_sft_step_are_neither_resumed_nor_trained_on(lm_run, tmp_path, capsys):
    """The SFT trained on after the reference pass (its root's `latest` names a later step):
    a resumed pass does not add the new step's log-probs to the old one's, and align refuses
    pairs scored by the old step (DPO's ratio would be against another model)."""
    sft = tmp_path / "sft" / "checkpoints"
    shutil.copytree(lm_run / "sft" / "checkpoints", sft)
    shutil.copy(lm_run / "labeled.jsonl", tmp_path / "labeled.jsonl")
    args = reference_args(tmp_path, tmp_path)  # its SFT and labeled file are the copies
    assert main(args) == 0
    scored_by = resolve_checkpoint(sft)
    shutil.copytree(scored_by, sft / "step_00000007")  # the SFT trained on
    (sft / "latest").write_text("step_00000007")
    assert main(align_args(tmp_path, "dpo", f"init.checkpoint={sft}")) == 2
    assert one_error_line(capsys) == (
        f"orlhf align: error: init.checkpoint: resolves to {sft / 'step_00000007'}, but the reference log-probs in "
        f"{tmp_path / 'reference' / 'pairs.jsonl'} were computed by {scored_by} (its dataset_card.json); rerun "
        "`orlhf reference` from this init.checkpoint, or point init.checkpoint at that one")
    (tmp_path / "reference" / "DONE").unlink()  # as after a crash before the merge: shards to resume
    assert main(args) == 2
    assert "model_step: differs from the run that wrote" in one_error_line(capsys)


def test_a_run_folder_moved_elsewhere_trains_on_its_own_reference_pass(lm_run, tmp_path, capsys):
    """The card names the scoring checkpoint relative to the run too: after the whole run
    moved (scratch to project storage), align finds it where the run is now; the checkpoint
    the card names in another run is still not this one."""
    scratch, storage = tmp_path / "scratch", tmp_path / "storage"
    shutil.copytree(lm_run / "sft" / "checkpoints", scratch / "sft" / "checkpoints")
    shutil.copy(lm_run / "labeled.jsonl", scratch / "labeled.jsonl")
    assert main(reference_args(scratch, scratch)) == 0
    scratch.rename(storage)
    assert main(align_args(storage, "dpo", f"init.checkpoint={storage}/sft/checkpoints")) == 0
    capsys.readouterr()
    assert main(align_args(tmp_path / "elsewhere", "dpo", f"data.pairs={storage}/reference/pairs.jsonl",
                           f"init.checkpoint={lm_run}/sft/checkpoints")) == 2
    assert "but the reference log-probs in" in one_error_line(capsys)


def test_pairs_identical_once_cut_are_skipped_and_counted_or_refused_with_strict(lm_run, tmp_path, capsys):
    """Two human pairs whose replies differ only past max_seq_len carry no signal (the RM
    stage drops them too): skipped and counted, an error with strict=true, and when no pair
    is left, an error either way."""
    shared = " ".join(["add"] * 80)
    rows = [{"prompt": "add 2 and 2", "response": f"{shared} {end}", "kind": side, "source": "human", "pair": 0,
             "reward": 0.0} for side, end in (("chosen", "4."), ("rejected", "5."))]
    rows += [{"prompt": "add 1 and 1", "response": text, "kind": side, "source": "human", "pair": 1, "reward": 0.0}
             for side, text in (("chosen", "1 plus 1 is 2."), ("rejected", "off topic."))]
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = reference_args(lm_run, tmp_path, f"input={labeled}")
    assert main(args) == 0
    assert [p["prompt"] for p in pairs_of(tmp_path)] == ["add 1 and 1"]
    card = json.loads((tmp_path / "reference" / "dataset_card.json").read_text())
    assert (card["identical_after_truncation"], card["pairs"]) == (1, 1)
    capsys.readouterr()
    assert main(reference_args(lm_run, tmp_path / "strict", f"input={labeled}", "strict=true")) == 2
    assert one_error_line(capsys) == (
        "orlhf reference: error: max_seq_len: 1 of 2 pairs have identical sides once cut to 64 tokens (first: "
        "prompt 'add 2 and 2'); raise max_seq_len, or strict=false to skip and count them")
    labeled.write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))  # no pair left
    assert main(reference_args(lm_run, tmp_path / "none", f"input={labeled}")) == 2
    assert one_error_line(capsys).endswith("(first: prompt 'add 2 and 2'); raise max_seq_len")
