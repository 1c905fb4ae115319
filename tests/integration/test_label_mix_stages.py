"""`orlhf label` and `orlhf mix` on the embedded task with a small reward model."""

import json
import os
import subprocess
import sys

import pytest
import torch

import offline_rlhf.stages.label as stage
from offline_rlhf.checkpoint import REWARD_STATS, CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.cli import main
from offline_rlhf.config.schema import ModelConfig, TemplateConfig
from offline_rlhf.data.chat_template import build_template
from offline_rlhf.data.sft_readers import read_sft_source
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_sft
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from offline_rlhf.labeling.scoring import scoring_metadata
from offline_rlhf.ledger import read_ledger
from offline_rlhf.models.llama import Transformer
from tests.fixtures import REPO_ROOT
from tests.local_data import OASST_TREES
from tests.unit.data.test_chat_template import CHATML

RM_CONFIG = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=128)


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    """A small embedded task and two random reward models: with and without stored statistics."""
    run_dir = tmp_path_factory.mktemp("label_run")
    assert main(["task", f"run_dir={run_dir}", "n_sft=60", "n_preferences=30", "n_gen_prompts=20",
                 "n_eval_prompts=10"]) == 0
    torch.manual_seed(0)
    model = Transformer(RM_CONFIG, head="value")
    model.init_weights()
    for name, metadata in (("rm_plain", {}), ("rm_stats", {REWARD_STATS: {"mean": 0.5, "std": 2.0, "count": 9}})):
        save_checkpoint(run_dir / name, model, CheckpointMeta(model=RM_CONFIG, head="value",
                                                              train_state=TrainState(), metadata=metadata),
                        tokenizer_dir=run_dir / "task" / "tokenizer")
    return run_dir


def label_args(run_dir, out, rm="rm_plain", *extra):
    task = run_dir / "task"
    return ["label", f"run_dir={out}", f"rm={run_dir / rm}",
            f"inputs=[{{name: gen, kind: generated, path: {task}/sft.jsonl, max_samples: 20}},"
            f" {{name: demos, kind: sft, format: jsonl, path: {task}/sft.jsonl}},"
            f" {{name: pairs, kind: preference, format: jsonl, path: {task}/preferences.jsonl}}]", *extra]


def labeled(out):
    return [json.loads(line) for line in (out / "label" / "labeled.jsonl").read_text().splitlines()]


def test_self_normalized_rewards_have_mean_0_std_1(task_run, tmp_path):
    assert main(label_args(task_run, tmp_path)) == 0
    records = labeled(tmp_path)
    assert len(records) == 20 + 60 + 2 * 30
    rewards = torch.tensor([r["reward"] for r in records], dtype=torch.float64)
    assert abs(rewards.mean().item()) < 1e-9 and abs(rewards.std(unbiased=False).item() - 1) < 1e-9
    meta = json.loads((tmp_path / "label" / "labels_meta.json").read_text())
    raw = torch.tensor([r["reward_raw"] for r in records], dtype=torch.float64)
    assert meta["normalization"] == "labeled_set" and abs(meta["stats"]["mean"] - raw.mean().item()) < 1e-9
    assert (tmp_path / "label" / "reward_histogram.png").stat().st_size > 10_000
    assert {r["kind"] for r in records} == {"generated", "sft", "chosen", "rejected"}


def test_stored_statistics_are_used_and_missing_ones_are_an_error(task_run, tmp_path, capsys):
    assert main(label_args(task_run, tmp_path / "stored", "rm_stats", "normalization=rm_stats")) == 0
    for record in labeled(tmp_path / "stored"):
        assert abs(record["reward"] - (record["reward_raw"] - 0.5) / 2.0) < 1e-9
    assert main(label_args(task_run, tmp_path / "missing", "rm_plain", "normalization=rm_stats")) == 2
    assert "normalization: rm_stats asked for, but the reward model" in capsys.readouterr().err


def test_tp2_labels_equal_tp1(task_run, tmp_path):
    assert main(label_args(task_run, tmp_path / "tp1")) == 0
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "offline_rlhf.cli", *label_args(task_run, tmp_path / "tp2", "rm_plain",
                                                                    "parallel.tp=2")],
                            cwd=REPO_ROOT, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    for one, two in zip(labeled(tmp_path / "tp1"), labeled(tmp_path / "tp2"), strict=True):
        assert (one["prompt"], one["response"]) == (two["prompt"], two["response"])
        assert abs(one["reward_raw"] - two["reward_raw"]) < 1e-5


def test_dp2_progress_counts_every_ranks_samples(task_run, tmp_path):
    """Two replicas each score half: the progress line counts both halves, to the total."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "offline_rlhf.cli", *label_args(task_run, tmp_path, "rm_plain", "parallel.dp=2",
                                                                    "batch_size=16")],
                            cwd=REPO_ROOT, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    lines = [line for line in result.stderr.decode().splitlines() if line.startswith("[progress] label:")]
    assert lines and lines[-1].startswith("[progress] label: sample 140/140 (100%)")
    assert len(labeled(tmp_path)) == 140


def mix(task_run, out, *extra):
    assert main(["mix", f"run_dir={out}", f"input={task_run / 'labeled' / 'label' / 'labeled.jsonl'}", *extra]) == 0
    return [json.loads(line) for line in (out / "mix" / "alignment.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def labeled_set(task_run):
    assert main(label_args(task_run, task_run / "labeled")) == 0


def test_mix_default_is_one_third_generated_with_whole_pairs(task_run, labeled_set, tmp_path):
    records = mix(task_run, tmp_path)
    kinds = [r["kind"] for r in records]
    assert kinds.count("generated") == 20 and len(records) == 60  # all 20 generated = one third
    assert kinds.count("sft") == 20 and kinds.count("chosen") == kinds.count("rejected") == 10
    pairs = {}
    for r in records:
        if r["kind"] in ("chosen", "rejected"):
            pairs.setdefault(r["pair"], set()).add(r["kind"])
    assert all(sides == {"chosen", "rejected"} for sides in pairs.values())
    card = json.loads((tmp_path / "mix" / "dataset_card.json").read_text())
    assert card["samples"] == 60 and set(card["rewards_by_source"]) == {"gen:generated", "demos:sft", "pairs:chosen",
                                                                       "pairs:rejected"}


def test_mix_counts_ratios_and_determinism(task_run, labeled_set, tmp_path):
    records = mix(task_run, tmp_path / "a", "total=40", "weights.generated=1", "weights.sft=2", "weights.preference=1")
    kinds = [r["kind"] for r in records]
    assert len(records) == 40 and kinds.count("generated") == 10 and kinds.count("sft") == 20
    assert kinds.count("chosen") == kinds.count("rejected") == 5
    again = mix(task_run, tmp_path / "b", "total=40", "weights.generated=1", "weights.sft=2", "weights.preference=1")
    assert again == records
    other = mix(task_run, tmp_path / "c", "total=40", "weights.generated=1", "weights.sft=2", "weights.preference=1",
                "seed=7")
    assert other != records


def test_select_best_keeps_one_answer_per_prompt_with_the_highest_reward(task_run, tmp_path):
    """Two answers per prompt (a generated file with n=2): `select=best` keeps the better."""
    rows = [json.loads(line) for line in (task_run / "task" / "sft.jsonl").read_text().splitlines()][:10]
    generated = tmp_path / "samples.jsonl"
    answers = [{"prompt": r["prompt"], "response": r["response"][:len(r["response"]) // k]}
               for r in rows for k in (1, 2)]
    generated.write_text("".join(json.dumps(answer) + "\n" for answer in answers))
    inputs = f"inputs=[{{name: gen, kind: generated, path: {generated}, select: %s}}]"
    assert main(["label", f"run_dir={tmp_path / 'all'}", f"rm={task_run / 'rm_plain'}", inputs % "all"]) == 0
    assert main(["label", f"run_dir={tmp_path / 'best'}", f"rm={task_run / 'rm_plain'}", inputs % "best"]) == 0
    everything, best = labeled(tmp_path / "all"), labeled(tmp_path / "best")
    assert len(everything) == 20 and len(best) == 10
    for kept, pair in zip(best, zip(everything[::2], everything[1::2])):
        assert kept["reward_raw"] == max(r["reward_raw"] for r in pair) and kept["prompt"] == pair[0]["prompt"]
    meta = json.loads((tmp_path / "best" / "label" / "labels_meta.json").read_text())
    assert meta["not_selected"] == 10


def test_label_scores_multi_turn_prompts_as_the_reward_model_was_trained(tmp_path, monkeypatch):
    """A generated record's `turns` reach the reward model, in `orlhf label` and `orlhf
    rm-score`: under template.kind=chat the scored ids are encode_sft's with the turns (not
    the folded history as one message); under the paper's template they are those of the
    folded prompt, as before; the labeled records keep the turns of multi-turn prompts only."""
    import offline_rlhf.stages.rm_score as rm_stage

    folder = tmp_path / "tokenizer"
    train_bpe_tokenizer([OASST_TREES], 400, folder, special_tokens=("<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"))
    tokenizer = Tokenizer.from_dir(folder)
    tokenizer.config["chat_template"] = CHATML
    tokenizer.save(folder)
    examples = read_sft_source("oasst", str(OASST_TREES), template=ChatTemplate())
    chosen = [next(e for e in examples if len(e.turns) >= 3), next(e for e in examples if not e.turns)]
    generated = tmp_path / "samples.jsonl"
    generated.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response, "finished": True,
                                             **({"turns": [list(t) for t in e.turns]} if e.turns else {})}) + "\n"
                                 for e in chosen))
    model = Transformer(RM_CONFIG, head="value")
    model.init_weights()
    scored, score = [], stage.score_sequences
    for module in (stage, rm_stage):
        monkeypatch.setattr(module, "score_sequences",
                            lambda m, sequences, *args: scored.append(sequences) or score(m, sequences, *args))
    for kind, template in (("chat", build_template(TemplateConfig(kind="chat"), tokenizer.config)),
                           ("paper", ChatTemplate())):
        rm = tmp_path / f"rm_{kind}"
        save_checkpoint(rm, model, CheckpointMeta(model=RM_CONFIG, head="value", train_state=TrainState(),
                                                  metadata=scoring_metadata(template, 128)), tokenizer_dir=folder)
        assert main(["label", f"run_dir={tmp_path / kind}", f"rm={rm}",
                     f"inputs=[{{name: gen, kind: generated, path: '{generated}'}}]"]) == 0
        with_turns = [encode_sft(tokenizer, template, e.prompt, e.response, 128, "x", turns=e.turns).input_ids
                      for e in chosen]
        assert [sequence.input_ids for sequence in scored.pop()] == with_turns
        # Uncut, the paper's format renders turns as their fold; cut to 128 tokens, a
        # conversation loses whole exchanges, a folded prompt its first tokens.
        uncut, folded = (encode_sft(tokenizer, template, chosen[0].prompt, chosen[0].response, max_len, "x").input_ids
                         for max_len in (4096, 128))
        assert (encode_sft(tokenizer, template, chosen[0].prompt, chosen[0].response, 4096, "x",
                           turns=chosen[0].turns).input_ids == uncut) == (kind == "paper")
        assert with_turns[0] != folded
        assert main(["rm-score", f"run_dir={tmp_path / kind}", f"ckpt={rm}", f"input={generated}",
                     f"output={tmp_path / kind / 'scored.jsonl'}"]) == 0
        assert [sequence.input_ids for sequence in scored.pop()] == with_turns
        records = labeled(tmp_path / kind)
        assert records[0]["turns"] == [list(t) for t in chosen[0].turns] and "turns" not in records[1]


def test_best_worst_is_the_same_at_any_batch_size_and_rows_join_back_to_the_samples(task_run, tmp_path):
    """Generated records as `orlhf generate` writes them (id, sample, ...), two answers per
    prompt and one prompt answered "." four times: at batch 7 and 64 alike, that prompt keeps
    one record (its copies are one answer) and every kept row names its sample and its role."""
    rows = [json.loads(line) for line in (task_run / "task" / "sft.jsonl").read_text().splitlines()]
    rows = [r for r in rows if len(r["response"].strip()) >= 8][:8]
    answers = [(r["prompt"], [r["response"], r["response"][:len(r["response"]) // 2].strip()]) for r in rows]
    answers.append(("Say nothing.", ["."] * 4))
    samples = [{"id": f"task-{p}", "sample": s, "prompt": prompt, "response": text, "model": "sft",
                "finished": True, "finish_reason": "eos", "prompt_truncated": False}
               for p, (prompt, texts) in enumerate(answers) for s, text in enumerate(texts)]
    generated = tmp_path / "samples.jsonl"
    generated.write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    by_key = {(s["id"], s["sample"]): s for s in samples}
    kept = {}
    for batch in (7, 64):
        assert main(["label", f"run_dir={tmp_path / str(batch)}", f"rm={task_run / 'rm_plain'}", f"batch_size={batch}",
                     f"inputs=[{{name: gen, kind: generated, path: {generated}, select: best_worst}}]"]) == 0
        records = labeled(tmp_path / str(batch))
        assert [r["selected"] for r in records if r["id"] == "task-8"] == ["only"]
        for record in records:
            source = by_key[record["id"], record["sample"]]
            assert (record["prompt"], record["response"], record["finish_reason"]) == \
                (source["prompt"], source["response"], "eos")
        for p in range(8):
            best, worst = (next(r for r in records if r["id"] == f"task-{p}" and r["selected"] == side)
                           for side in ("best", "worst"))
            assert best["reward_raw"] > worst["reward_raw"]
        kept[batch] = [(r["id"], r["sample"], r["selected"]) for r in records]
    assert kept[7] == kept[64] and len(kept[7]) == 17


def test_mix_says_which_group_it_repeats(task_run, labeled_set, tmp_path, capsys):
    records = mix(task_run, tmp_path, "weights.sft=6")
    out = capsys.readouterr().out
    assert len(records) == 20 + 120 + 20
    assert "mix: sft repeated 2.0x (60 available, 120 drawn); lower weights.sft or total to repeat less" in out
    assert out.count("repeated") == 1
    card = json.loads((tmp_path / "mix" / "dataset_card.json").read_text())
    assert card["groups"]["sft"]["repetition"] == 2.0 and card["groups"]["generated"]["repetition"] == 1.0
    assert "| sft | 60 | 120 | 60 | 2.00x |" in (tmp_path / "mix" / "dataset_card.md").read_text()


def test_duplicate_input_names_and_all_zero_mix_weights_are_config_errors(task_run, tmp_path, capsys):
    task = task_run / "task"
    assert main(["label", f"run_dir={tmp_path}", f"rm={task_run / 'rm_plain'}",
                 f"inputs=[{{name: gen, kind: generated, path: {task}/sft.jsonl, select: best}},"
                 f" {{name: gen, kind: sft, format: jsonl, path: {task}/sft.jsonl}}]"]) == 2
    assert capsys.readouterr().err.strip() == ("orlhf label: error: inputs[gen].name: names two inputs; give each "
                                               "input its own name (its records' `source` in labeled.jsonl)")
    assert main(["mix", f"run_dir={tmp_path}", f"input={tmp_path}/missing.jsonl", "weights.generated=0",
                 "weights.sft=0", "weights.preference=0"]) == 2
    assert "orlhf mix: error: weights: are all 0" in capsys.readouterr().err


# `orlhf label` keeps the raw rewards it scored, `write_every` samples at a time: a rerun
# after a kill scores only the rest (it started over: hours lost at a million samples, and a
# Slurm time limit shorter than the whole labeling could never finish it), cuts a block a
# kill tore, and scores again what another reward model, config or input scored.

SAMPLES = 20 + 60 + 2 * 30  # label_args' inputs
BLOCK = "write_every=32"


class Killed(Exception):
    """The process dies while scoring a block."""


def scoring_counted(monkeypatch, kill_at: int | None = None) -> list[int]:
    """The sizes of the blocks scored from now on; the `kill_at`-th (1-based) dies."""
    blocks, score = [], stage.score_sequences

    def counted(model, sequences, *args):
        blocks.append(len(sequences))
        if len(blocks) == kill_at:
            raise Killed
        return score(model, sequences, *args)

    monkeypatch.setattr(stage, "score_sequences", counted)
    return blocks


def test_a_killed_labeling_goes_on_from_the_blocks_it_saved(task_run, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    assert main(label_args(task_run, straight, "rm_plain", BLOCK)) == 0
    assert sorted(p.name for p in (straight / "label").iterdir() if p.name.startswith("scores")) == []

    killed = tmp_path / "killed"
    scoring_counted(monkeypatch, kill_at=3)
    with pytest.raises(Killed):
        main(label_args(task_run, killed, "rm_plain", BLOCK))
    saved = (killed / "label" / stage.SCORES).read_text().splitlines()
    assert [len(json.loads(line)["scores"]) for line in saved] == [32, 32]
    with open(killed / "label" / stage.SCORES, "a") as handle:
        handle.write('{"scores": [0.5, 0.2')  # a third block the kill tore

    blocks = scoring_counted(monkeypatch)
    capsys.readouterr()
    assert main(label_args(task_run, killed, "rm_plain", "write_every=50")) == 0  # a new block size may resume
    assert blocks == [50, SAMPLES - 64 - 50]  # the torn block is scored again, the two saved ones are not
    out = capsys.readouterr().out
    assert "label: scoring 140 samples with" in out and "(64 scored before, kept)" in out
    for ours, theirs in zip(labeled(killed), labeled(straight), strict=True):
        assert ours["reward_raw"] == pytest.approx(theirs["reward_raw"], abs=1e-6)
    assert not (killed / "label" / stage.SCORES).exists()
    rows = [row for row in read_ledger(killed) if row.stage == "label"]
    assert [row.status for row in rows] == ["failed", "completed"]
    # The failed execution's two saved blocks are charged to it (it was charged nothing).
    [whole] = [row.tokens for row in read_ledger(straight) if row.stage == "label"]
    assert 0 < rows[0].tokens < whole and rows[0].tokens + rows[1].tokens == whole


def test_scores_of_another_reward_model_are_scored_again(task_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    scoring_counted(monkeypatch, kill_at=2)
    with pytest.raises(Killed):
        main(label_args(task_run, run, "rm_plain", BLOCK))
    blocks = scoring_counted(monkeypatch)
    capsys.readouterr()
    assert main(label_args(task_run, run, "rm_stats", BLOCK)) == 0
    assert blocks == [32, 32, 32, 32, SAMPLES - 128]
    assert f"label: scoring again: reward model changed since {run / 'label' / stage.SCORES} was written" in \
        capsys.readouterr().out
