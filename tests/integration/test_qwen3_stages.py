"""A Qwen3 model (q/k norms per head) through the real stages: imported from a Hugging Face
folder, fine-tuned by `orlhf sft` in one process and under torchrun at TP=2 to the same
weights (each rank's gradient of the shared norms covers its heads only: summed, they
match), and exported back to a folder transformers loads with the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import transformers

from offline_rlhf.checkpoint import resolve_checkpoint
from offline_rlhf.cli import main as orlhf
from tests.fixtures import REPO_ROOT
from tests.integration.test_convert_cli import hf_dir_with_tokenizer
from tests.unit.models.test_hf_convert import fixed_batch, load_ours


def sft_args(run_dir, hf_dir, data) -> list[str]:
    return ["sft", f"run_dir={run_dir}", f"init.checkpoint={hf_dir}", "data.max_seq_len=64",
            f"data.sources=[{{name: d, format: jsonl, path: '{data}'}}]", "data.val_fraction=0",
            "train.global_batch=4", "train.micro_batch=2", "train.max_steps=3", "optim.lr=1e-2",
            "optim.warmup_steps=0", "logging.progress=false"]


def test_qwen3_fine_tuned_at_tp2_matches_one_process_and_exports(tmp_path):
    hf_model, _ = hf_dir_with_tokenizer(tmp_path, "qwen3", "CausalLM")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {word}.", "response": f"{word} {word}, {word}!"}) + "\n"
                            for word in ("to be", "or not", "that is", "the question", "whether", "tis nobler")))
    assert orlhf(sft_args(tmp_path / "one", tmp_path / "hf", data)) == 0
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "offline_rlhf.cli", *sft_args(tmp_path / "tp2", tmp_path / "hf", data),
                             "parallel.tp=2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    one, tp2 = load_ours(tmp_path / "one" / "sft" / "checkpoints"), load_ours(tmp_path / "tp2" / "sft" / "checkpoints")
    start = hf_model.state_dict()["model.layers.0.self_attn.q_norm.weight"]
    assert not torch.allclose(one.layers[0].attention.q_norm.weight, start)  # the norms trained
    for (name, ours), theirs in zip(one.state_dict().items(), tp2.state_dict().values(), strict=True):
        torch.testing.assert_close(theirs, ours, atol=1e-6 if "norm" in name else 1e-4, rtol=1e-4, msg=name)

    exported = tmp_path / "exported"
    assert orlhf(["convert", "export_hf", f"ckpt={resolve_checkpoint(tmp_path / 'tp2' / 'sft' / 'checkpoints')}",
                  f"out={exported}"]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    tokens = fixed_batch()
    with torch.no_grad():
        assert (reloaded(tokens).logits - tp2(tokens)).abs().max().item() <= 1e-5
