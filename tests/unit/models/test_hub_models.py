"""Models by hub name: a tiny Llama and a tiny Qwen2 saved with transformers into a hub cache
built by the test, loaded by repo id with HF_HUB_OFFLINE=1 through `init.checkpoint`
(imported once into the run directory) and `orlhf convert import_hf hf_dir=org/name`; the
logits match transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import InitConfig
from offline_rlhf.config.tools import ConvertConfig
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from offline_rlhf.stage_checks import tokenizer_dir
from offline_rlhf.stage_support import IMPORTED_DIR, local_init, model_config
from offline_rlhf.stages.convert import main as convert
from tests.unit.data.test_tokenizer import SHAKESPEARE
from tests.unit.models.test_hf_convert import TINY, fixed_batch, load_ours, tiny_hf_model
from tests.unit.test_hub import hub_repo, offline_hub


def cached_model(tmp_path, monkeypatch, model_type: str, task: str = "CausalLM"):
    """A tiny transformers model plus a tokenizer, as `tiny-org/tiny-{model_type}` in an
    offline hub cache. Returns the transformers model and the repo id."""
    cache = offline_hub(monkeypatch, tmp_path / "hub")
    hf_model = tiny_hf_model(model_type, task=task)
    hf_model.save_pretrained(tmp_path / "saved")
    train_bpe_tokenizer([SHAKESPEARE], TINY["vocab_size"], tmp_path / "saved")
    repo = f"tiny-org/tiny-{model_type}"
    hub_repo(cache, repo, tmp_path / "saved")
    return hf_model, repo


def max_logit_error(ours, hf_model) -> float:
    tokens = fixed_batch()
    with torch.no_grad():
        return (ours(tokens) - hf_model(tokens).logits).abs().max().item()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_init_checkpoint_by_repo_id_is_imported_once_into_the_run(tmp_path, monkeypatch, capsys, model_type):
    hf_model, repo = cached_model(tmp_path, monkeypatch, model_type)
    run_dir = tmp_path / "run"

    init = local_init(InitConfig(checkpoint=repo), run_dir)
    assert capsys.readouterr().out.startswith(f"init.checkpoint: imported {tmp_path / 'hub'}")
    imported = run_dir / IMPORTED_DIR / repo.replace("/", "--")
    assert init.checkpoint == str(imported / "step_00000000")
    assert max_logit_error(load_ours(imported), hf_model) <= 1e-5
    assert model_config(init, None).qkv_bias == (model_type == "qwen2")
    assert Tokenizer.from_dir(tokenizer_dir(init)).encode("To be") == \
        Tokenizer.from_dir(tmp_path / "saved").encode("To be")

    stamp = (imported / "step_00000000" / ".metadata").stat().st_mtime_ns
    assert local_init(InitConfig(checkpoint=repo), run_dir) == init  # a later stage or rerun reuses it
    assert capsys.readouterr().out.startswith(f"init.checkpoint: reusing the import of {repo} made at ")
    assert (imported / "step_00000000" / ".metadata").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_convert_import_hf_takes_a_repo_id(tmp_path, monkeypatch, model_type):
    hf_model, repo = cached_model(tmp_path, monkeypatch, model_type)
    assert convert(ConvertConfig(action="import_hf", hf_dir=repo, out=str(tmp_path / "ckpt"))) == 0
    assert max_logit_error(load_ours(tmp_path / "ckpt"), hf_model) <= 1e-5


def test_a_reward_model_repo_is_imported_with_its_value_head(tmp_path, monkeypatch):
    hf_model, repo = cached_model(tmp_path, monkeypatch, "llama", task="SequenceClassification")
    init = local_init(InitConfig(checkpoint=repo), tmp_path / "run")
    ours = load_ours(Path(init.checkpoint).parent)
    tokens = fixed_batch()
    with torch.no_grad():
        assert (ours(tokens)[:, -1] - hf_model(tokens).logits[:, 0]).abs().max().item() <= 1e-5


def test_a_local_hf_folder_as_init_checkpoint_and_a_hub_tokenizer(tmp_path, monkeypatch):
    hf_model, repo = cached_model(tmp_path, monkeypatch, "llama")
    init = local_init(InitConfig(checkpoint=str(tmp_path / "saved"), tokenizer=repo), tmp_path / "run")
    assert init.checkpoint.startswith(str(tmp_path / "run" / IMPORTED_DIR / "saved-"))
    assert max_logit_error(load_ours(Path(init.checkpoint).parent), hf_model) <= 1e-5
    assert init.tokenizer == str(tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" /
                                 "0123456789abcdef0123456789abcdef01234567")


def test_only_safetensors_are_imported(tmp_path, monkeypatch):
    cache = offline_hub(monkeypatch, tmp_path / "hub")
    model = tiny_hf_model("llama")
    model.config.save_pretrained(tmp_path / "saved")
    torch.save(model.state_dict(), tmp_path / "saved" / "pytorch_model.bin")  # a pickle, as older repos ship
    hub_repo(cache, "tiny-org/pickled", tmp_path / "saved")
    with pytest.raises(ConfigError, match="only safetensors checkpoints are supported"):
        local_init(InitConfig(checkpoint="tiny-org/pickled"), tmp_path / "run")


def test_an_unreachable_repo_is_one_line_naming_the_key(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "hub")
    with pytest.raises(ConfigError) as err:
        local_init(InitConfig(checkpoint="tiny-org/absent"), tmp_path / "run")
    assert str(err.value).startswith("init.checkpoint: tiny-org/absent is not in the Hugging Face cache")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / IMPORTED_DIR / "tiny-org--absent" / "latest").exists()
