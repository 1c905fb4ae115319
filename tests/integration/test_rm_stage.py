"""`orlhf rm` end to end on pairs from a known rule: it learns the rule, stores reward
statistics that the scoring function reproduces, evaluates (eval_only), scores files
(rm-score), and exports to a transformers sequence classifier with the same scores."""

import json
import shutil

import pytest
import torch

from offline_rlhf.checkpoint import (
    REWARD_STATS,
    CheckpointMeta,
    TrainState,
    latest_checkpoint,
    read_meta,
    save_checkpoint,
)
from offline_rlhf.cli import main
from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data.preference_dataset import build_preference_dataset
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.labeling.scoring import encode_responses, load_reward_model, reward_stats, score_texts
from offline_rlhf.ledger import read_ledger
from offline_rlhf.metrics import read_metrics
from offline_rlhf.parallel.dims import ParallelDims
from tests.fixtures import reference_model, runtime_for
from tests.local_data import jsonl_data
from tests.synthetic_preferences import MODEL, synthetic_tokenizer, write_preferences

PAIRS, VAL_FRACTION, SEED, MAX_LEN = 300, 0.2, 1234, 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An `lm` checkpoint standing in for SFT, then `orlhf rm` from it. Returns (run_dir, data file)."""
    root = tmp_path_factory.mktemp("rm")
    tokenizer_dir = root / "tokenizer"
    synthetic_tokenizer(tokenizer_dir)
    save_checkpoint(root / "sft", reference_model(MODEL, "lm"), CheckpointMeta(MODEL, "lm", TrainState()),
                    tokenizer_dir=tokenizer_dir)
    data = write_preferences(root / "pairs.jsonl", PAIRS)
    run_dir = root / "run"
    assert main(rm_args(run_dir, root / "sft", data)) == 0
    return run_dir, data


def rm_args(run_dir, sft, data):
    return ["rm", f"run_dir={run_dir}", f"init.checkpoint={sft}", *data_args(data), "train.global_batch=16",
            "train.micro_batch=8", "train.max_steps=60", "train.val_every=30", "optim.lr=3e-3",
            "optim.warmup_steps=5", "logging.progress=false"]


def data_args(path):
    return [jsonl_data("synthetic", path), f"data.max_seq_len={MAX_LEN}", f"data.val_fraction={VAL_FRACTION}"]


def checkpoint(run_dir):
    return latest_checkpoint(run_dir / "rm" / "checkpoints")


def single_process_model(run_dir):
    rt = runtime_for(ParallelDims(dp=1, tp=1), None)
    model, tokenizer, metadata = load_reward_model(str(checkpoint(run_dir)), rt)
    return model, tokenizer, metadata, rt


def test_rm_learns_the_rule_and_logs_its_metrics(trained):
    run_dir, _ = trained
    stage = run_dir / "rm"
    rows = read_metrics(stage)
    val = [row for row in rows if "val/accuracy" in row]
    # 60 validation pairs: chance is 0.5 with standard error sqrt(0.25 / 60) = 0.065, so
    # 0.85 is more than 5 standard errors above chance; the rule itself ranks every pair.
    assert len(val) == 2 and val[-1]["val/accuracy"] >= 0.85, val
    assert val[-1]["val/margin"] > 0 and val[-1]["val/loss"] < 0.6931  # below log 2, the loss of a tie
    train_rows = [row for row in rows if "train/loss" in row]
    assert [row["step"] for row in train_rows] == list(range(1, 61))
    assert {"train/accuracy", "train/chosen_reward", "train/rejected_reward", "train/margin"} <= set(train_rows[-1])
    assert (stage / "DONE").read_text().strip() == str(checkpoint(run_dir))
    card = json.loads((stage / "dataset_card.json").read_text())
    assert card["train"]["documents"] + card["val"]["documents"] == PAIRS and card["val"]["documents"] == 60
    [row] = read_ledger(run_dir)
    assert row.stage == "rm" and row.status == "completed" and row.tokens > 0


def test_a_rerun_of_a_finished_rm_says_it_was_complete(trained, tmp_path, capsys):
    run_dir, data = trained
    shutil.copytree(run_dir, tmp_path / "run")
    capsys.readouterr()
    assert main(rm_args(tmp_path / "run", run_dir.parent / "sft", data)) == 0
    out = capsys.readouterr().out
    assert "rm done: 60 steps, already complete (its validation is in metrics.jsonl), final checkpoint" in out
    assert "nan" not in out


def test_a_rerun_over_an_sft_trained_again_refuses_to_keep_the_old_reward_model(trained, tmp_path, capsys):
    """Its checkpoint grew from the old SFT's weights: resumed (or taken as complete), every
    later stage would score with a reward model of the SFT that is gone."""
    run_dir, data = trained
    sft, tokenizer = tmp_path / "sft", run_dir.parent / "tokenizer"
    save_checkpoint(sft, reference_model(MODEL, "lm"), CheckpointMeta(MODEL, "lm", TrainState()),
                    tokenizer_dir=tokenizer)
    args = short_rm_args(tmp_path / "run", sft, data, "data.val_fraction=0.2")
    assert main(args) == 0 and main(args) == 0  # the same SFT step: complete, as before
    shutil.rmtree(sft)  # trained again: the same path, other weights
    save_checkpoint(sft, reference_model(MODEL, "lm", seed=1), CheckpointMeta(MODEL, "lm", TrainState(step=7)),
                    tokenizer_dir=tokenizer)
    capsys.readouterr()
    assert main(args) == 2
    [line] = capsys.readouterr().err.splitlines()
    rm = tmp_path / "run" / "rm"
    assert line.startswith(f"orlhf rm: error: init.checkpoint's step: differs from the run that wrote {rm}") and \
        f"delete {rm}" in line, line


def test_stored_statistics_match_the_scoring_function_on_validation_responses(trained):
    run_dir, data = trained
    meta = read_meta(checkpoint(run_dir))
    assert meta.head == "value" and meta.metadata["max_seq_len"] == MAX_LEN
    stored = meta.metadata["reward_stats"]
    model, tokenizer, metadata, rt = single_process_model(run_dir)
    cfg = DataConfig(sources=[SourceConfig(name="synthetic", format="jsonl", path=str(data))], max_seq_len=MAX_LEN,
                     val_fraction=VAL_FRACTION, pack=False)
    val = build_preference_dataset(cfg, tokenizer, SEED).val
    texts = [(p.example.prompt, reply) for p in val for reply in (p.example.chosen, p.example.rejected)]
    recomputed = reward_stats(score_texts(model, tokenizer, ChatTemplate(), texts, 5, rt, max_len=MAX_LEN),
                              "validation responses")
    assert stored["count"] == recomputed["count"] == 120
    assert stored["mean"] == pytest.approx(recomputed["mean"], abs=1e-5)
    assert stored["std"] == pytest.approx(recomputed["std"], abs=1e-5) and stored["std"] > 0


def test_eval_only_reports_accuracy_without_training(trained):
    run_dir, data = trained
    assert main(["rm", f"run_dir={run_dir}", "eval_only=true", f"init.checkpoint={run_dir / 'rm' / 'checkpoints'}",
                 *data_args(data), "train.micro_batch=32", "logging.progress=false"]) == 0
    report = json.loads((run_dir / "rm_eval" / "eval.json").read_text())
    model, tokenizer, _, rt = single_process_model(run_dir)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    chosen = score_texts(model, tokenizer, ChatTemplate(), [(r["prompt"], r["chosen"]) for r in records], 32, rt)
    rejected = score_texts(model, tokenizer, ChatTemplate(), [(r["prompt"], r["rejected"]) for r in records], 32, rt)
    assert report["pairs"] == PAIRS
    assert report["accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / PAIRS)
    assert report["accuracy"] >= 0.85
    assert latest_checkpoint(run_dir / "rm" / "checkpoints") == checkpoint(run_dir)  # nothing new saved


def test_rm_score_adds_reward_raw_to_every_record(trained, tmp_path):
    run_dir, data = trained
    out = tmp_path / "scored.jsonl"
    inputs = tmp_path / "samples.jsonl"
    records = [{"prompt": r["prompt"], "response": r["chosen"], "id": i}
               for i, r in enumerate(map(json.loads, data.read_text().splitlines()[:10]))]
    inputs.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["rm-score", f"run_dir={tmp_path}", f"ckpt={run_dir / 'rm' / 'checkpoints'}", f"input={inputs}",
                 f"output={out}", "batch_size=3"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    model, tokenizer, _, rt = single_process_model(run_dir)
    expected = score_texts(model, tokenizer, ChatTemplate(), [(r["prompt"], r["response"]) for r in records], 8, rt)
    assert [{k: v for k, v in r.items() if k != "reward_raw"} for r in scored] == records
    assert [r["reward_raw"] for r in scored] == pytest.approx(expected, abs=1e-5)


def test_rm_score_ends_with_done_so_a_pipeline_rerun_skips_it(trained, tmp_path):
    """Was: no DONE, so every rerun of a pipeline scored its files again."""
    from launcher.local import is_complete
    from launcher.plan import StagePlan, resolve_stage_config, stage_folder

    run_dir, data = trained
    (inputs := tmp_path / "samples.jsonl").write_text(
        "".join(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n"
                for r in map(json.loads, data.read_text().splitlines()[:4])))
    args = (f"ckpt={run_dir / 'rm' / 'checkpoints'}", f"input={inputs}", f"output={tmp_path / 'scored.jsonl'}",
            f"run_dir={tmp_path}")
    assert main(["rm-score", *args]) == 0
    stage_dir = tmp_path / stage_folder("rm-score", {})
    assert (stage_dir / "DONE").read_text() == f"{tmp_path / 'scored.jsonl'}\n"
    plan = StagePlan(name="rm_score", stage="rm-score", args=args, nodes=1, procs_per_node=1, stage_dir=stage_dir,
                     config_yaml=resolve_stage_config("stages[0]", "rm-score", args), time_limit=None)
    assert is_complete(plan)


def test_rm_checkpoint_exports_to_transformers_with_the_same_scores(trained, tmp_path):
    import transformers
    run_dir, data = trained
    exported = tmp_path / "hf"
    assert main(["convert", "export_hf", f"ckpt={run_dir / 'rm' / 'checkpoints'}", f"out={exported}",
                 "head=value"]) == 0
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(exported).eval()
    model, tokenizer, _, rt = single_process_model(run_dir)
    records = [json.loads(line) for line in data.read_text().splitlines()[:6]]
    texts = [(r["prompt"], r["chosen"]) for r in records]
    ours = score_texts(model, tokenizer, ChatTemplate(), texts, 6, rt, max_len=MAX_LEN)
    sequences = encode_responses(tokenizer, ChatTemplate(), texts, MAX_LEN)
    longest = max(map(len, sequences))
    tokens = torch.tensor([list(s.input_ids) + [tokenizer.pad_id] * (longest - len(s)) for s in sequences])
    with torch.no_grad():  # right-padded batch: transformers reads the last non-pad token
        theirs = hf_model(tokens).logits.squeeze(-1)
    assert theirs.tolist() == pytest.approx(ours, abs=1e-5)
    # Its normalization statistics travel in config.json, and come back with an import
    # (was: dropped, so `orlhf label normalization=rm_stats` refused the round-tripped RM).
    stats = read_meta(latest_checkpoint(run_dir / "rm" / "checkpoints")).metadata[REWARD_STATS]
    assert hf_model.config.reward_stats == stats and stats["std"] > 0
    assert main(["convert", "import_hf", f"hf_dir={exported}", f"out={tmp_path / 'back'}", "head=value"]) == 0
    assert read_meta(tmp_path / "back" / "step_00000000").metadata == {REWARD_STATS: stats}


# --- pairs that truncation leaves identical (replies sharing more than MAX_LEN tokens): skipped and counted

SHARED_START = " ".join(["apple river stone"] * 30)
TRUNCATED = {"prompt": "hi", "chosen": f"{SHARED_START} good", "rejected": f"{SHARED_START} cloud"}


def short_rm_args(run_dir, sft, data, *extra):
    return ["rm", f"run_dir={run_dir}", f"init.checkpoint={sft}", jsonl_data("synthetic", data),
            f"data.max_seq_len={MAX_LEN}", "train.global_batch=2", "train.micro_batch=2", "train.max_steps=1",
            "logging.progress=false", *extra]


def write_records(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_a_pair_identical_after_truncation_is_counted_in_the_last_line(trained, tmp_path, capsys):
    run_dir, data = trained
    records = [json.loads(line) for line in data.read_text().splitlines()[:8]]
    pairs = write_records(tmp_path / "pairs.jsonl", [TRUNCATED, *records])
    capsys.readouterr()
    assert main(short_rm_args(tmp_path / "run", run_dir.parent / "sft", pairs, "data.val_fraction=0.2")) == 0
    [done] = [line for line in capsys.readouterr().out.splitlines() if "rm done:" in line]
    assert "pairs 1 skipped (1 identical after truncation), 0 duplicates" in done
    card = (tmp_path / "run" / "rm" / "dataset_card.md").read_text()
    assert "synthetic: 1 skipped (1 identical after truncation)" in card
    assert main(short_rm_args(tmp_path / "strict", run_dir.parent / "sft", pairs, "data.strict=true")) == 2
    assert capsys.readouterr().err == (f"orlhf rm: error: {pairs}:1: expected 'chosen' and 'rejected' to "
                                       f"differ within data.max_seq_len={MAX_LEN} tokens (identical after "
                                       "truncation)\n")


def test_no_training_or_validation_pair_left_is_a_one_line_error(trained, tmp_path, capsys):
    run_dir, data = trained
    pairs = write_records(tmp_path / "pairs.jsonl", [TRUNCATED, json.loads(data.read_text().splitlines()[0])])
    capsys.readouterr()
    # Of the two pairs, train.seed=1 puts the truncated one in training, 1234 in validation.
    for seed, side, (train_pairs, val_pairs) in ((1, "training items", (0, 1)), (1234, "validation pairs", (1, 0))):
        run = tmp_path / f"run{seed}"
        args = short_rm_args(run, run_dir.parent / "sft", pairs, "data.val_fraction=0.5", f"train.seed={seed}")
        assert main(args) == 2
        card = json.loads((run / "rm" / "dataset_card.json").read_text())
        assert (card["train"]["documents"], card["val"]["documents"], card["totals"]["skipped"]) == (train_pairs,
                                                                                                     val_pairs, 1)
        error = capsys.readouterr().err
        assert error.startswith(f"orlhf rm: error: data: no {side}: ") and error.count("\n") == 1, error
        assert not (run / "rm" / "DONE").exists()
    only_truncated = write_records(tmp_path / "truncated.jsonl", [TRUNCATED, {**TRUNCATED, "chosen": SHARED_START}])
    assert main(short_rm_args(tmp_path / "run2", run_dir.parent / "sft", only_truncated)) == 2
    assert capsys.readouterr().err == ("orlhf rm: error: synthetic: expected at least one usable pair (2 skipped "
                                       "(2 identical after truncation); raise data.max_seq_len, or data.strict=true "
                                       "names the first)\n")
