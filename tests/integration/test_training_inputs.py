"""What a training stage checks of its inputs: a run resumes only over the data it was
training on (its checkpoint's data position indexes the training items, so input files
rewritten since, a mix regenerated under the same path, are refused by a digest of the
items' tokens), and a global batch that cannot split is said before any data is read."""

import json

from offline_rlhf.checkpoint import latest_checkpoint
from offline_rlhf.cli import main
from tests.local_data import SELF_INSTRUCT


def write_records(path, count):
    tasks = [json.loads(line) for line in SELF_INSTRUCT.read_text().splitlines()[:count]]
    path.write_text("".join(json.dumps({"prompt": t["instruction"], "response": t["instances"][0]["output"] or "ok"})
                            + "\n" for t in tasks))


def sft(run_dir, data, tokenizer, max_steps):
    return main(["sft", f"run_dir={run_dir}", f"init.tokenizer={tokenizer}", "data.max_seq_len=64",
                 f"data.sources=[{{name: mine, format: jsonl, path: '{data}'}}]", "train.global_batch=4",
                 "train.micro_batch=4", "optim.lr=1e-3", "logging.progress=false", f"train.max_steps={max_steps}",
                 "train.save_every=2"])


def test_a_resume_over_rewritten_training_data_is_refused(tmp_path, public_tokenizer, capsys):
    data, run_dir = tmp_path / "mine.jsonl", tmp_path / "run"
    write_records(data, 60)
    assert sft(run_dir, data, public_tokenizer, 2) == 0
    original = data.read_text()
    card = (run_dir / "sft" / "dataset_card.json").read_text()
    write_records(data, 40)  # the same path, other contents
    capsys.readouterr()
    assert sft(run_dir, data, public_tokenizer, 4) == 2
    assert capsys.readouterr().err.startswith(
        f"orlhf sft: error: training data: differs from the run that wrote {run_dir / 'sft' / 'checkpoints'}")
    assert (run_dir / "sft" / "dataset_card.json").read_text() == card  # was: the refused rerun's 40 records
    data.write_text(original)
    assert sft(run_dir, data, public_tokenizer, 4) == 0
    assert latest_checkpoint(run_dir / "sft" / "checkpoints").name == "step_00000004"


def test_a_global_batch_that_does_not_split_is_said_before_any_data_is_read(tmp_path, public_tokenizer, capsys):
    data = tmp_path / "broken.jsonl"
    data.write_text("{not json\n")  # reading it would fail first
    assert main(["sft", f"run_dir={tmp_path / 'run'}", f"init.tokenizer={public_tokenizer}",
                 f"data.sources=[{{name: mine, format: jsonl, path: '{data}'}}]", "train.global_batch=6",
                 "train.micro_batch=4"]) == 2
    assert capsys.readouterr().err.startswith("orlhf sft: error: train.global_batch: 6 is not divisible by "
                                              "train.micro_batch=4 x data-parallel size 1")
