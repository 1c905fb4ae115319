"""Hub names (offline_rlhf.hub): the rule that tells a repo id from a local path, resolution
through a Hugging Face cache laid out as the hub lays it out (built here, read with
HF_HUB_OFFLINE=1), and the one-line error for a repo that cannot be resolved offline.

`offline_hub` and `hub_repo` are shared with the model and dataset tests: huggingface_hub
reads HF_HUB_CACHE and HF_HUB_OFFLINE once, when first imported, so a test process that
imported it long before points its constants at the test's cache; subprocess tests set the
environment variables themselves."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.hub import MODEL_FILES, RepoRef, parse_repo_id, resolve_dir, snapshot

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def offline_hub(monkeypatch, cache: Path) -> Path:
    """HF_HUB_CACHE=cache, HF_HUB_OFFLINE=1 and a datasets cache beside it, for this
    process (huggingface_hub's and datasets' constants) and its children (the environment)."""
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setattr(constants, name, value)
        monkeypatch.setenv(name, "1" if value is True else value)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache.parent / "datasets"))
    datasets = sys.modules.get("datasets")  # not imported yet: it will read the environment
    if datasets is not None:
        for name, value in (("HF_HUB_OFFLINE", True), ("HF_DATASETS_OFFLINE", True),
                            ("HF_DATASETS_CACHE", cache.parent / "datasets")):
            monkeypatch.setattr(datasets.config, name, value)
    return cache


def hub_repo(cache: Path, repo_id: str, files: Path, repo_type: str = "model", commit: str = COMMIT,
             ref: str = "main") -> Path:
    """Copy `files` (a folder) into `cache` as the hub cache holds a downloaded repo:
    `{type}s--org--name/snapshots/<commit>/...` and `refs/<ref>` naming the commit."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    shutil.copytree(files, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return root / "snapshots" / commit


# ---------------------------------------------------------------------------- id or path


@pytest.mark.parametrize("value, expected", [
    ("meta-llama/Llama-3.2-1B", RepoRef("meta-llama/Llama-3.2-1B")),
    ("Qwen/Qwen2.5-0.5B-Instruct@main", RepoRef("Qwen/Qwen2.5-0.5B-Instruct", "main")),
    ("org/name@refs/pr/1", RepoRef("org/name", "refs/pr/1")),
    ("org/name@" + COMMIT, RepoRef("org/name", COMMIT)),
    ("runs/demo/sft/checkpoints", None),  # two slashes: a path
    ("./org/name", None),
    ("/abs/org", None),
    ("../org/name", None),
    ("checkpoint", None),  # no slash
    ("org/../name", None),
    ("org/name.", None),
    ("", None),
])
def test_repo_id_or_local_path(value, expected):
    assert parse_repo_id(value) == expected


def test_an_existing_local_path_wins_over_the_repo_id_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_repo_id("org/name") == RepoRef("org/name")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_repo_id("org/name") is None
    assert resolve_dir("org/name", "hf_dir") == Path("org/name")


def test_folder_names_are_file_system_safe():
    assert RepoRef("org/name").folder_name == "org--name"
    assert RepoRef("org/name", "refs/pr/1").folder_name == "org--name--refs--pr--1"


# ---------------------------------------------------------------------------- resolution


def test_offline_resolution_serves_the_cached_snapshot_and_pinned_revisions(tmp_path, monkeypatch):
    cache = offline_hub(monkeypatch, tmp_path / "hub")
    files = tmp_path / "files"
    files.mkdir()
    (files / "config.json").write_text('{"model_type": "llama"}')
    main = hub_repo(cache, "org/tiny", files)
    other = "f" * 40
    pinned = hub_repo(cache, "org/tiny", files, commit=other, ref="v1")

    assert resolve_dir("org/tiny", "hf_dir") == main
    assert (resolve_dir("org/tiny", "hf_dir") / "config.json").read_text() == '{"model_type": "llama"}'
    assert resolve_dir("org/tiny@v1", "hf_dir") == pinned
    assert resolve_dir(f"org/tiny@{other}", "hf_dir") == pinned


def test_a_repo_missing_offline_is_one_line_that_says_how_to_fix_it(tmp_path, monkeypatch):
    cache = offline_hub(monkeypatch, tmp_path / "hub")
    with pytest.raises(ConfigError) as err:
        snapshot(RepoRef("org/absent", "v2"), "init.checkpoint", MODEL_FILES)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"init.checkpoint: org/absent@v2 is not in the Hugging Face cache ({cache}) "
                              "and the hub cannot be reached (HF_HUB_OFFLINE=1)")
    assert "hf download org/absent --revision v2" in message and "point init.checkpoint at a local copy" in message


def test_dataset_repos_resolve_from_their_own_cache_folders(tmp_path, monkeypatch):
    cache = offline_hub(monkeypatch, tmp_path / "hub")
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    folder = hub_repo(cache, "org/data", files, repo_type="dataset")
    assert snapshot(RepoRef("org/data"), "path", None, repo_type="dataset") == folder
    with pytest.raises(ConfigError, match="org/data is not in the Hugging Face cache"):
        snapshot(RepoRef("org/data"), "path", None, repo_type="model")  # a model of that name is not cached
    with pytest.raises(ConfigError, match=r"\(hf download org/other --repo-type dataset\)"):
        snapshot(RepoRef("org/other"), "path", None, repo_type="dataset")


@pytest.mark.parametrize("revision", ["../../../planted", "/etc", "refs//pr", "v1/../main", ".hidden", "v1..2", "v1/"])
def test_a_revision_that_is_no_git_name_is_refused_in_one_line(revision):
    with pytest.raises(ConfigError) as err:
        parse_repo_id(f"org/name@{revision}")
    assert str(err.value).startswith(f"org/name@{revision}: revision {revision!r} of org/name is no branch, tag")
    with pytest.raises(ConfigError, match=r"^init.checkpoint: revision .* pin an existing branch, tag or commit"):
        resolve_dir(f"org/name@{revision}", "init.checkpoint")
    with pytest.raises(ConfigError, match=r"^path: revision"):
        snapshot(RepoRef("org/name", revision), "path", None, repo_type="dataset")


def test_a_revision_cannot_lead_the_cache_to_a_folder_outside_it(tmp_path, monkeypatch):
    """huggingface_hub reads `refs/<revision>` offline and returns `snapshots/<what it says>`:
    with `..` a planted file outside the cache would name any folder on the machine."""
    cache = offline_hub(monkeypatch, tmp_path / "hub")
    files = tmp_path / "files"
    files.mkdir()
    (files / "config.json").write_text("{}")
    hub_repo(cache, "org/tiny", files)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "planted").write_text("../../../elsewhere")  # refs/../../../planted is tmp_path/planted
    with pytest.raises(ConfigError, match="revision '../../../planted' of org/tiny is no branch, tag or commit"):
        resolve_dir("org/tiny@../../../planted", "hf_dir")
