"""`orlhf align` for each method, from an SFT checkpoint and a reward-labeled file."""

import json

import pytest

from offline_rlhf.checkpoint import latest_checkpoint, read_meta
from offline_rlhf.cli import main
from offline_rlhf.data.alignment_dataset import encode_labeled, read_labeled
from offline_rlhf.data.records import iter_json_objects
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import IGNORE_INDEX, encode_prompt
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.ledger import read_ledger
from offline_rlhf.metrics import read_metrics
from tests.integration.conftest import SELF_INSTRUCT
from tests.integration.test_sft_stage import sft_args


def labeled_file(path, limit=96):
    """self-instruct instances with a made-up normalized reward (longer answers score higher)."""
    rows = []
    for _, task in iter_json_objects(SELF_INSTRUCT):
        for instance in task["instances"]:
            rows.append({"prompt": task["instruction"], "response": instance["output"]})
    rows = [r for r in rows if r["response"].strip()][:limit]
    lengths = [len(r["response"]) for r in rows]
    mean = sum(lengths) / len(lengths)
    std = (sum((n - mean) ** 2 for n in lengths) / len(lengths)) ** 0.5
    path.write_text("".join(json.dumps({**r, "reward": (n - mean) / std}) + "\n" for r, n in zip(rows, lengths)))
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, public_tokenizer):
    run_dir = tmp_path_factory.mktemp("align_run")
    assert main(sft_args(run_dir, public_tokenizer, "train.max_steps=4", "train.save_every=4")) == 0
    return run_dir


@pytest.mark.parametrize("method,extra_metric", [("mle_filter", "kept_fraction"), ("rwr", "ess_fraction"),
                                                 ("dt", None)])
def test_align_method_end_to_end(sft_run, method, extra_metric):
    labeled = labeled_file(sft_run / f"labeled_{method}.jsonl")
    assert main(["align", f"run_dir={sft_run}", f"method={method}", f"data.path={labeled}", "data.max_seq_len=128",
                 "train.global_batch=8", "train.micro_batch=4", "train.max_steps=3", "logging.progress=false"]) == 0
    stage = sft_run / f"align_{method}"
    assert (stage / "DONE").exists() and (stage / "config.yaml").exists()
    meta = read_meta(latest_checkpoint(stage / "checkpoints"))
    assert meta.metadata["alignment"]["method"] == method and meta.train_state.step == 3
    rows = [row for row in read_metrics(stage) if "train/loss" in row]
    assert len(rows) == 3 and all(row["train/loss"] > 0 for row in rows)
    if extra_metric:
        values = [row[f"train/{extra_metric}"] for row in rows]
        assert all(0 < v <= 1 for v in values)
    if method == "mle_filter":
        positive = sum(e.reward > 0 for e in read_labeled(labeled)) / 96
        assert 0.1 < positive < 0.9  # the filter really drops some samples
    assert any(row.stage == f"align_{method}" and row.status == "completed" for row in read_ledger(sft_run))


def test_dt_reward_prompt_tokens_identical_in_training_and_inference(public_tokenizer, tmp_path):
    tokenizer = Tokenizer.from_dir(public_tokenizer)
    template = ChatTemplate()
    example = read_labeled(labeled_file(tmp_path / "labeled.jsonl", limit=4))[0]
    trained = encode_labeled(example, tokenizer, template, max_len=512, reward_prompt=True)
    prompt_length = trained.labels.count(IGNORE_INDEX)
    at_inference = encode_prompt(tokenizer, template, example.prompt, template.reward_prompt(example.reward))
    assert list(trained.input_ids[:prompt_length]) == at_inference
    assert tokenizer.decode(at_inference).endswith(f"Assistant: <rm_score> {example.reward:.1f}")
