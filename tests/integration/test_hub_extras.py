"""The optional pieces as a user meets them on the command line: `orlhf convert import_hf`
with a hub repo id under HF_HOME and HF_HUB_OFFLINE=1 (real environment variables, in a
fresh process), the one line for a repo the cache lacks, and logging extras that are not
installed refused at the start in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from offline_rlhf.cli import main as orlhf
from offline_rlhf.data.tokenizer import train_bpe_tokenizer
from tests.fixtures import REPO_ROOT
from tests.unit.data.test_tokenizer import SHAKESPEARE
from tests.unit.models.test_hf_convert import TINY, fixed_batch, load_ours, tiny_hf_model
from tests.unit.test_hub import hub_repo


def orlhf_offline(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "offline_rlhf.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_hf_by_repo_id_from_hf_home_offline(tmp_path):
    hf_model = tiny_hf_model("qwen2")
    hf_model.save_pretrained(tmp_path / "saved")
    train_bpe_tokenizer([SHAKESPEARE], TINY["vocab_size"], tmp_path / "saved")
    hub_repo(tmp_path / "hf" / "hub", "tiny-org/tiny-qwen2", tmp_path / "saved")

    done = orlhf_offline(tmp_path, "convert", "import_hf", "hf_dir=tiny-org/tiny-qwen2", f"out={tmp_path / 'ckpt'}")
    assert done.returncode == 0, done.stderr
    assert "imported " in done.stdout and "models--tiny-org--tiny-qwen2" in done.stdout
    tokens = fixed_batch()
    with torch.no_grad():
        assert (load_ours(tmp_path / "ckpt")(tokens) - hf_model(tokens).logits).abs().max().item() <= 1e-5
    assert (tmp_path / "ckpt" / "step_00000000" / "tokenizer" / "tokenizer.json").is_file()


IMPORT_ONCE = """
import sys
from offline_rlhf.config.schema import InitConfig
from offline_rlhf.stage_support import local_init
print("checkpoint", local_init(InitConfig(checkpoint="tiny-org/tiny-qwen2"), sys.argv[1]).checkpoint)
"""


def test_processes_starting_together_import_a_hub_model_once(tmp_path):
    """Ranks of one job (or stages started together) share the run directory: one imports,
    the others wait for its checkpoint."""
    tiny_hf_model("qwen2").save_pretrained(tmp_path / "saved")
    train_bpe_tokenizer([SHAKESPEARE], TINY["vocab_size"], tmp_path / "saved")
    hub_repo(tmp_path / "hf" / "hub", "tiny-org/tiny-qwen2", tmp_path / "saved")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    procs = [subprocess.Popen([sys.executable, "-c", IMPORT_ONCE, str(tmp_path / "run")], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    assert sum("init.checkpoint: imported" in out for out in outputs) == 1
    expected = tmp_path / "run" / "imported" / "tiny-org--tiny-qwen2" / "step_00000000"
    assert all(out.strip().endswith(f"checkpoint {expected}") for out in outputs)
    assert not (expected.parent / ".lock").exists()


def test_a_repo_the_cache_lacks_is_one_line_on_stderr(tmp_path):
    done = orlhf_offline(tmp_path, "convert", "import_hf", "hf_dir=tiny-org/absent", f"out={tmp_path / 'ckpt'}")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"orlhf convert: error: hf_dir: tiny-org/absent is not in the Hugging Face cache ({tmp_path / 'hf' / 'hub'}) "
        "and the hub cannot be reached (HF_HUB_OFFLINE=1); download it where there is network "
        "(hf download tiny-org/absent) into the same HF_HOME, or point hf_dir at a local copy")


@pytest.mark.parametrize("stage", ["sft", "rm"])
@pytest.mark.parametrize("extra", ["tensorboard", "wandb"])
def test_a_logging_extra_that_is_not_installed_stops_the_stage_at_start(tmp_path, monkeypatch, capsys, stage,
                                                                        extra):
    monkeypatch.setitem(sys.modules, extra, None)  # as if not installed: `import` and find_spec both fail
    assert orlhf([stage, f"run_dir={tmp_path}", f"logging.{extra}=true"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"orlhf {stage}: error: logging.{extra}: is true but the {extra} package is not installed; "
        f"pip install 'offline-rlhf[{extra}]', or set logging.{extra}=false")
    assert not (tmp_path / stage).exists()  # nothing started: no stage folder, no data read
