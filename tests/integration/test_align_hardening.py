"""`orlhf align` and `orlhf mix` refuse what used to train silently or crash: non-finite
rewards, a run whose steps were all skipped, an empty filter, malformed mix input; MLE
with filtering trains on the kept samples only and RWR warns when its clamp saturates.
Tiny random-init models on the embedded task's tokenizer, so each run takes seconds."""

import json
import random

import pytest

from offline_rlhf.checkpoint import latest_checkpoint, read_meta
from offline_rlhf.cli import main
from offline_rlhf.ledger import read_ledger
from offline_rlhf.metrics import read_metrics


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hardening")
    assert main(["task", f"run_dir={run_dir}", "n_sft=40", "n_preferences=10", "n_gen_prompts=10",
                 "n_eval_prompts=5"]) == 0
    return run_dir


def write_labeled(task, name, rewards=None, scale=1.0):
    rows = [json.loads(line) for line in (task / "task" / "sft.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    rewards = rewards or [scale * rng.gauss(0, 1) for _ in rows]
    path = task / name
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"], "reward": w}) + "\n"
                            for r, w in zip(rows, rewards)))
    return path


def align(task, run_dir, method, data, *extra):
    return main(["align", f"run_dir={run_dir}", f"method={method}", f"data.path={data}", "init.checkpoint=",
                 f"init.tokenizer={task / 'task' / 'tokenizer'}", "data.max_seq_len=64", "model.max_seq_len=64",
                 "train.global_batch=8", "train.micro_batch=4", "train.max_steps=3", "logging.progress=false",
                 *extra])


def one_error_line(capsys) -> str:
    [line] = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.mark.parametrize("method", ["mle_filter", "rwr", "dt"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
def test_non_finite_reward_fails_every_method_naming_the_line(task, tmp_path, capsys, method, literal):
    path = write_labeled(task, f"bad_{literal}.jsonl")
    lines = path.read_text().splitlines()
    lines[6] = lines[6].rsplit('"reward": ', 1)[0] + f'"reward": {literal}}}'
    path.write_text("\n".join(lines) + "\n")
    assert align(task, tmp_path, method, path) == 2
    assert one_error_line(capsys) == (f"orlhf align: error: {path}:7: expected 'reward' to be a finite number "
                                      f"(got {float(literal)})")
    assert not (tmp_path / f"align_{method}" / "DONE").exists()


def test_a_run_of_skipped_steps_fails_without_done(task, tmp_path, capsys):
    """lr=1e30: the first step throws the weights to ~1e30 and every later gradient is NaN."""
    assert align(task, tmp_path, "dt", write_labeled(task, "ok.jsonl"), "optim.lr=1e30", "train.max_steps=4",
                 "train.save_every=100") == 2
    line = one_error_line(capsys)
    assert line.startswith("orlhf align: error: train.max_skipped_fraction: 3 of 4 steps (of 4 planned) were "
                           "skipped for a non-finite loss or gradient norm")
    stage = tmp_path / "align_dt"
    assert not (stage / "DONE").exists() and latest_checkpoint(stage / "checkpoints") is None
    assert [row["train/skipped_step"] for row in read_metrics(stage)] == [0.0, 1.0, 1.0, 1.0]
    assert [row.status for row in read_ledger(tmp_path)] == ["failed"]


def test_mle_filter_trains_on_kept_samples_only(task, tmp_path, capsys):
    path = write_labeled(task, "ok.jsonl")
    assert align(task, tmp_path, "mle_filter", path, "train.max_steps=-1", "train.epochs=1", "data.val_fraction=0") == 0
    out = capsys.readouterr().out
    kept = sum(json.loads(line)["reward"] > 0 for line in path.read_text().splitlines())
    assert 0 < kept < 40
    assert f"training: {kept} items, {-(-kept // 8)} steps of 8" in out  # not ceil(40 / 8) = 5
    assert f"{40 - kept} filtered out" in out
    meta = read_meta(latest_checkpoint(tmp_path / "align_mle_filter" / "checkpoints"))
    assert meta.train_state.step == -(-kept // 8)
    assert meta.metadata["alignment"]["dataset"]["filter"]["train_filtered"] == 40 - kept
    rows = [row for row in read_metrics(tmp_path / "align_mle_filter") if "train/loss" in row]
    assert all(row["train/kept_fraction"] == 1.0 for row in rows)  # nothing filtered is ever computed


def test_mle_filter_that_keeps_nothing_is_one_line(task, tmp_path, capsys):
    path = write_labeled(task, "ok.jsonl")
    assert align(task, tmp_path, "mle_filter", path, "filter_threshold=50") == 2
    assert one_error_line(capsys).startswith(f"orlhf align: error: {path}: expected a training sample with "
                                             "'reward' > 50.0 (filter_threshold; the highest of ")


def test_rwr_warns_once_when_the_log_weight_clamp_saturates(task, tmp_path, capsys):
    assert align(task, tmp_path, "rwr", write_labeled(task, "huge.jsonl", scale=200.0)) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "log-weight clamp" in line]
    assert len(warnings) == 1 and warnings[0].startswith("rwr: warning: ")
    assert align(task, tmp_path / "normal", "rwr", write_labeled(task, "ok.jsonl")) == 0
    assert "log-weight clamp" not in capsys.readouterr().out


def mix_line(**fields):
    return json.dumps({"prompt": "p", "response": "r", "kind": "generated", "source": "gen", "reward": 0.1,
                       **fields})


@pytest.mark.parametrize("bad,expected", [
    ('{"prompt": "p", "response": "r", "kind": "generated", "source": "g", "reward": NaN}',
     "expected 'reward' to be a finite number (got nan)"),
    (mix_line(kind="weird"), "expected 'kind' to be one of generated, sft, chosen, rejected (got 'weird')"),
    (mix_line(kind="chosen"), "expected a chosen record to have an integer 'pair'"),
    (mix_line(reward="1"), "expected 'reward' to be a number (got str)"),
])
def test_mix_rejects_bad_records_in_one_line(tmp_path, capsys, bad, expected):
    """Each was a traceback (KeyError, AttributeError, TypeError) with exit 1, or worse a
    record of the wrong type copied into alignment.jsonl."""
    path = tmp_path / "labeled.jsonl"
    path.write_text("\n".join([mix_line(), mix_line(kind="sft"), bad]) + "\n")
    assert main(["mix", f"run_dir={tmp_path}", f"input={path}"]) == 2
    assert one_error_line(capsys).startswith(f"orlhf mix: error: {path}:3: {expected}")
    assert not (tmp_path / "mix" / "alignment.jsonl").exists() and not (tmp_path / "mix" / "DONE").exists()
