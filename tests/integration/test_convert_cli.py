"""`orlhf convert` end to end: a transformers model and a trained tokenizer go in through
import_hf, come out through export_hf, and transformers loads the result with the same
outputs (causal LM logits; reward-model scores at the last non-pad token)."""

from __future__ import annotations

import json

import torch
import transformers

from offline_rlhf.cli import main as orlhf
from offline_rlhf.data.tokenizer import train_bpe_tokenizer
from offline_rlhf.models.llama import last_token_values
from tests.unit.data.test_tokenizer import SHAKESPEARE
from tests.unit.models.test_hf_convert import TINY, fixed_batch, load_ours, tiny_hf_model


def hf_dir_with_tokenizer(tmp_path, model_type: str, task: str):
    """A saved tiny transformers model plus a BPE tokenizer whose vocabulary fills it."""
    hf_model = tiny_hf_model(model_type, task=task)
    hf_model.save_pretrained(tmp_path / "hf")
    tokenizer = train_bpe_tokenizer([SHAKESPEARE], TINY["vocab_size"], tmp_path / "hf")
    return hf_model, tokenizer


def convert_round_trip(tmp_path, head: str):
    """import_hf then export_hf through the CLI; returns (checkpoint root, export dir)."""
    ckpt, exported = tmp_path / "ckpt", tmp_path / "exported"
    assert orlhf(["convert", "import_hf", f"hf_dir={tmp_path / 'hf'}", f"out={ckpt}", f"head={head}"]) == 0
    assert orlhf(["convert", "export_hf", f"ckpt={ckpt}", f"out={exported}", f"head={head}"]) == 0
    return ckpt, exported


def test_causal_lm_round_trip_through_cli_loads_in_transformers(tmp_path):
    hf_model, tokenizer = hf_dir_with_tokenizer(tmp_path, "qwen2", "CausalLM")
    ckpt, exported = convert_round_trip(tmp_path, "lm")

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    tokens = fixed_batch()
    with torch.no_grad():
        ours, theirs = load_ours(ckpt)(tokens), reloaded(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - hf_model(tokens).logits).abs().max().item() <= 1e-5

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert hf_tokenizer("To be, or not to be")["input_ids"] == tokenizer.encode("To be, or not to be")
    config = json.loads((exported / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_id, tokenizer.eos_id)


def test_reward_model_round_trip_scores_last_non_pad_token(tmp_path):
    _, tokenizer = hf_dir_with_tokenizer(tmp_path, "llama", "SequenceClassification")
    ckpt, exported = convert_round_trip(tmp_path, "value")

    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(exported).eval()
    assert reloaded.config.num_labels == 1 and reloaded.config.pad_token_id == tokenizer.pad_id
    tokens, lengths = fixed_batch(), torch.tensor([24, 15])
    tokens[1, 15:] = tokenizer.pad_id  # right padding
    with torch.no_grad():
        ours = last_token_values(load_ours(ckpt)(tokens), lengths)
        theirs = reloaded(tokens).logits.squeeze(-1)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_cli_reports_unsupported_model_in_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **TINY}))
    assert orlhf(["convert", "import_hf", f"hf_dir={tmp_path}", f"out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"orlhf convert: error: {tmp_path / 'config.json'}: model_type: unsupported 'gpt2'; " \
                  "supported: llama, mistral, qwen2, qwen3"


def test_a_reward_model_imported_without_head_value_names_the_fix(tmp_path, capsys):
    """Was: "no tensor 'lm_head.weight' ... (wrong head or model type?)", far from its cause."""
    hf_dir_with_tokenizer(tmp_path, "llama", "SequenceClassification")
    capsys.readouterr()  # transformers' own progress while saving the model
    assert orlhf(["convert", "import_hf", f"hf_dir={tmp_path / 'hf'}", f"out={tmp_path / 'ckpt'}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"orlhf convert: error: head: {tmp_path / 'hf'}/config.json names a reward model "
        "(`*ForSequenceClassification`), not a 'lm' head; pass head=value")
    assert not (tmp_path / "ckpt").exists()
