"""The README's "Your own model and data", as a new user runs it: a clone with no ../shared
beside it, a tiny Llama with a ChatML chat template and three datasets in a local Hugging
Face cache (HF_HUB_OFFLINE=1), and SFT -> RM -> generate -> label -> mix -> DT by repo id and
`format: hf` alone, with `template.kind=chat`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offline_rlhf.checkpoint import latest_checkpoint, read_meta
from offline_rlhf.data.tokenizer import train_bpe_tokenizer
from tests.fixtures import REPO_ROOT
from tests.unit.config.test_shipped_defaults import PROJECT_PARTS
from tests.unit.data.test_chat_template import CHATML
from tests.unit.data.test_hub_datasets import dataset_repo
from tests.unit.models.test_hf_convert import TINY, tiny_hf_model
from tests.unit.test_hub import hub_repo, offline_hub

pytestmark = pytest.mark.slow

CHATS = [{"messages": [{"role": "user", "content": f"Name a colour number {i}."},
                       {"role": "assistant", "content": "Blue." if i % 2 else "Green, like grass."},
                       {"role": "user", "content": "Another one?"},
                       {"role": "assistant", "content": "Red."}]} for i in range(24)]
PREFS = [{"prompt": f"Say something kind {i}.", "chosen": "You are doing well.", "rejected": "No."}
         for i in range(24)]
PROMPTS = [{"prompt": f"Name a fruit number {i}."} for i in range(6)]
CHAT = "data.template.kind=chat"
SMALL = ["data.max_seq_len=64", "train.global_batch=8", "train.micro_batch=8", "train.val_every=0"]


@pytest.fixture
def clone(tmp_path):
    """The project as a user's clone has it, with no ../shared beside it."""
    for part in PROJECT_PARTS:
        shutil.copytree(REPO_ROOT / part, tmp_path / "project" / part, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def build_hub(root: Path, monkeypatch) -> dict[str, str]:
    """tiny-org/chat-llama (weights, a BPE tokenizer with ChatML's markers and template) and
    tiny-org/{chats,prefs,prompts} in a cache; the environment a user's offline node has."""
    cache = offline_hub(monkeypatch, root / "hf" / "hub")
    saved = root / "saved"
    tiny_hf_model("llama").save_pretrained(saved)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(json.dumps(row) for row in CHATS + PREFS + PROMPTS) * 4)
    tokenizer = train_bpe_tokenizer([corpus], TINY["vocab_size"], saved,
                                    special_tokens=("<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"))
    tokenizer.config["chat_template"] = CHATML
    tokenizer.save(saved)
    hub_repo(cache, "tiny-org/chat-llama", saved)
    for name, rows in (("chats", CHATS), ("prefs", PREFS), ("prompts", PROMPTS)):
        dataset_repo(cache, root, f"tiny-org/{name}", {"train.jsonl": rows})
    keys = ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE")
    return {key: os.environ[key] for key in keys}


def orlhf(clone: Path, env: dict[str, str], *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "offline_rlhf.cli", *args], cwd=clone / "project",
                          env={**os.environ, **env, "PYTHONPATH": str(clone / "project")},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"orlhf {args[0]}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_sft_to_dt_on_a_hub_model_and_hub_datasets_without_shared(clone, monkeypatch):
    assert not (clone / "shared").exists()
    env = build_hub(clone, monkeypatch)
    run = clone / "run"
    orlhf(clone, env, "sft", f"run_dir={run}", "init.checkpoint=tiny-org/chat-llama", CHAT,
          "data.sources=[{name: chats, format: hf, path: tiny-org/chats}]", "train.epochs=2", *SMALL)
    orlhf(clone, env, "rm", f"run_dir={run}", CHAT, "data.sources=[{name: prefs, format: hf, path: tiny-org/prefs}]",
          *SMALL)
    orlhf(clone, env, "generate", f"run_dir={run}", "generation.max_new_tokens=8",
          "sources=[{name: fruit, kind: prompts, format: hf, path: tiny-org/prompts}]")
    orlhf(clone, env, "label", f"run_dir={run}", "include_unfinished=true",
          f"inputs=[{{name: generated, kind: generated, path: '{run}/generate/samples.jsonl'}}]")
    orlhf(clone, env, "mix", f"run_dir={run}")
    orlhf(clone, env, "align", f"run_dir={run}", "method=dt", "dt_target=1.0", CHAT, *SMALL)

    assert [p.name for p in (run / "imported").iterdir()] == ["tiny-org--chat-llama"]  # imported once
    sft = json.loads((run / "sft" / "dataset_card.json").read_text())
    assert sft["totals"]["taken"] == 48  # both assistant turns of each of the 24 conversations
    samples = [json.loads(line) for line in (run / "generate" / "samples.jsonl").read_text().splitlines()]
    assert sorted(s["prompt"] for s in samples) == sorted(p["prompt"] for p in PROMPTS)
    for stage in ("sft", "align_dt"):
        meta = read_meta(latest_checkpoint(run / stage / "checkpoints"))
        assert meta.metadata["template"] == {"kind": "chat", "system": ""}, stage
    assert (run / "align_dt" / "DONE").exists()
