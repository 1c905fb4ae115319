"""`orlhf label` says when the reward model's length limit makes answers identical: generated
answers that differ only past the cut are one candidate for best/worst selection (marked
"only", never a best and a worst scored alike), counted beside "not selected" in the last
line and in labels_meta.json, with human pairs whose two sides are cut to one sequence."""

import json

import pytest

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.cli import main
from tests.fixtures import reference_model
from tests.synthetic_preferences import MODEL, preference_records, synthetic_tokenizer

pytestmark = pytest.mark.slow
LONG = " ".join(["apple river stone cloud music paper green window table light"] * 8)  # > 64 tokens


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_ties")
    synthetic_tokenizer(root / "tokenizer")
    save_checkpoint(root / "rm", reference_model(MODEL, "value"), CheckpointMeta(MODEL, "value", TrainState()),
                    tokenizer_dir=root / "tokenizer")
    generated = [{"prompt": "Say something about apple.", "response": f"{LONG} {end}"} for end in ("good", "paper",
                                                                                                      "river stone")]
    generated += [{"prompt": "Say something about paper.", "response": f"{LONG} {end}"} for end in ("good", "cloud")]
    generated += [{"prompt": "Say something about music.", "response": end} for end in ("good music", "paper", "good")]
    (root / "generated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generated))
    pairs = preference_records(6)
    pairs[2].update(chosen=f"{LONG} good good", rejected=f"{LONG} stone")  # differ past the cut only
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return root


def test_answers_identical_once_cut_are_one_candidate_and_counted(files, tmp_path, capsys):
    assert main(["label", f"run_dir={tmp_path}", f"rm={files / 'rm'}", "parallel.dp=1",
                 f"inputs=[{{name: gen, kind: generated, path: {files}/generated.jsonl, select: best_worst}},"
                 f" {{name: pairs, kind: preference, format: jsonl, path: {files}/pairs.jsonl}}]"]) == 0
    records = [json.loads(line) for line in (tmp_path / "label" / "labeled.jsonl").read_text().splitlines()]
    meta = json.loads((tmp_path / "label" / "labels_meta.json").read_text())
    generated = [(r["prompt"], r["selected"]) for r in records if r["kind"] == "generated"]
    # apple's three answers and paper's two are one sequence each once cut: one candidate, "only".
    assert generated == [("Say something about apple.", "only"), ("Say something about paper.", "only"),
                         ("Say something about music.", "best"), ("Say something about music.", "worst")] or \
        generated == [("Say something about apple.", "only"), ("Say something about paper.", "only"),
                      ("Say something about music.", "worst"), ("Say something about music.", "best")]
    assert meta["not_selected"] == 4
    assert meta["identical_once_cut"] == {"reason": "identical once cut to the reward model's 64 tokens",
                                          "answers": 3, "prompts": 2, "pairs": 1}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "4 not selected (inputs' select; 3 of them identical to another answer once cut to the reward " \
           "model's 64 tokens, leaving 2 prompts one answer: a reward model trained with a larger " \
           "data.max_seq_len would tell them apart)" in last
    assert "1 preference pairs identical once cut to the reward model's 64 tokens (kept, scored alike)" in last
