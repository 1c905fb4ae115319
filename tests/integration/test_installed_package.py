"""The project installed as a wheel (`pip install .`, a container's build), not as the editable
checkout: the shipped configs come with it, so every stage and the launcher compose from the
package, and a user's configs come from their own folder (`--config-dir`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import REPO_ROOT
from tests.unit.config.test_config_dirs import MODEL, user_configs
from tests.unit.launcher.test_config_dirs import PIPELINE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (links kept as git has them) and installed
    into a folder of its own, without dependencies (the test's environment has them)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for part in ("offline_rlhf", "ppo_baseline", "launcher", "conf"):
        shutil.copytree(REPO_ROOT / part, source / part, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((root / "dist").glob("offline_rlhf-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(root / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return root / "site"


def python_in(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python ARGS` importing the installed package first, from a folder outside the checkout."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(site)})


def test_the_wheel_carries_the_shipped_configs(installed, tmp_path):
    where = python_in(installed, tmp_path, "-c", "import offline_rlhf.config.compose as c, launcher.schema as s; "
                                                 "print(c.__file__); print(c.CONF_DIR.is_dir(), s.CONF_DIR.is_dir())")
    module, found = where.stdout.splitlines()
    assert module.startswith(str(installed)) and found == "True True", where.stderr
    assert not (installed / "offline_rlhf" / "conf").is_symlink()  # a copy, not a link into the checkout
    assert sorted(p.name for p in (installed / "offline_rlhf" / "conf" / "stage").iterdir()) == \
        sorted(p.name for p in (REPO_ROOT / "conf" / "stage").iterdir())
    done = python_in(installed, tmp_path, "-m", "offline_rlhf.cli", "sft", "init.tokenizer=tok", "--cfg")
    assert done.returncode == 0, done.stderr
    assert "lr: 5.0e-06" in done.stdout and "global_batch: 128" in done.stdout  # conf/stage/sft.yaml's


def test_an_installed_launcher_runs_a_users_pipeline_from_their_folder(installed, tmp_path):
    conf = user_configs(tmp_path / "conf", {"model/mine.yaml": MODEL, "pipeline/mine.yaml": PIPELINE})
    done = python_in(installed, tmp_path, "-m", "offline_rlhf.cli", "pipeline", "--config-dir", str(conf),
                     "pipeline=mine", f"run_dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stdout + done.stderr
    config = (tmp_path / "run" / "smoke" / "config.yaml").read_text()
    assert "model:\n  name: mine\n" in config and "steps: 2\n" in config
    assert (tmp_path / "run" / "smoke" / "DONE").exists()
