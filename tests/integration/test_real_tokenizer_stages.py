"""`orlhf sft` with the real Qwen3 tokenizer and its own chat template
(tests/real_tokenizers.py) on the Open Assistant trees, whose conversations carry earlier
turns: every answer with a history used to be refused under that template. The model has
Qwen3's padded vocabulary (151,936 rows), so the LM head's loss runs in chunks of its
labelled tokens (`head_token_nll`)."""

import json
import math

from offline_rlhf.checkpoint import latest_checkpoint, read_meta
from offline_rlhf.cli import main
from offline_rlhf.metrics import read_metrics
from offline_rlhf.parallel.logprobs import LOGITS_PER_CHUNK
from tests.local_data import OASST_TREES
from tests.real_tokenizers import real_tokenizer_dir

QWEN3_VOCAB = 151936


def test_sft_on_multi_turn_conversations_with_the_real_qwen3_template(tmp_path):
    run_dir = tmp_path / "run"
    tokenizer = real_tokenizer_dir("qwen3")
    assert main(["sft", f"run_dir={run_dir}", f"init.tokenizer={tokenizer}", "model=tiny",
                 f"model.vocab_size={QWEN3_VOCAB}", "data.template.kind=chat", "data.max_seq_len=256",
                 f"data.sources=[{{name: oasst, format: oasst, path: '{OASST_TREES}'}}]",
                 "train.global_batch=8", "train.micro_batch=8", "train.max_steps=2", "train.val_every=0",
                 "logging.progress=false"]) == 0
    stage = run_dir / "sft"
    card = json.loads((stage / "dataset_card.json").read_text())
    assert card["totals"]["taken"] == 142, card["totals"]  # every answer of the trees, histories included
    losses = [row["train/loss"] for row in read_metrics(stage) if "train/loss" in row]
    assert len(losses) == 2 and abs(losses[0] - math.log(QWEN3_VOCAB)) < 0.1  # a random model: near uniform
    rows = card["train"]["sequences"] + card["val"]["sequences"]
    assert card["totals"]["response_tokens"] / rows * 8 > LOGITS_PER_CHUNK // QWEN3_VOCAB  # several chunks a batch
    meta = read_meta(latest_checkpoint(stage / "checkpoints"))
    assert meta.metadata["template"]["kind"] == "chat"
